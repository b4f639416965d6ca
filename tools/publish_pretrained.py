"""Maintainers' tool: ship a trained algorithmic run as ``pretrained:NAME``.

Copies the run's selected checkpoint (weights + metadata, not the optimiser state) into
``src/softshare/pretrained/NAME/``, scores it exactly as ``softshare eval`` does and records what
it scores, how it was trained and how it was scored in ``catalogue.json``; ``tests/test_pretrained.py``
then checks that the shipped net still scores that.

    python tools/publish_pretrained.py RUN NAME "one-line description" --sizes 32 128 512 --count 100
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
from pathlib import Path

from softshare.checkpoint import find_checkpoint, read_meta
from softshare.eval.algorithmic import score_task_checkpoint
from softshare.pretrained import HERE, catalogue
from softshare.storage import atomic_path, write_json
from softshare.train.config import resolve_config
from softshare.train.resume import LOCATION_FIELDS, RUNTIME_FIELDS


def training_command(config: dict) -> str:
    """The `softshare train` line that reproduces the run: preset, body, seed and every recipe field
    where the run differs from what that line resolves to today (defaults change; the line must not)."""
    body = config["model"].rsplit("_", 1)[-1]
    preset = {"prefix-sums": "prefix_sums_cpu", "mazes": "mazes_cpu"}[config["task"]]
    given = {"model": body, "seed": config["seed"]}
    if body == "shared":
        given["num_templates"] = config["num_templates"]
    resolved = resolve_config(preset, overrides=given).to_dict()
    skip = set(LOCATION_FIELDS) | set(RUNTIME_FIELDS) | {"model", "task"}
    extra = {key: value for key, value in config.items()
             if key in resolved and key not in skip and key not in given and resolved[key] != value}
    words = [f"--{key.replace('_', '-')} {_word(value)}" for key, value in {**given, **extra}.items()]
    return f"softshare train --preset {preset} " + " ".join(words)


def _word(value) -> str:
    if isinstance(value, dict):
        return shlex.quote(json.dumps(value, separators=(",", ":")))
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def publish(run: Path, name: str, description: str, sizes: list[int], count: int) -> dict:
    checkpoint = find_checkpoint(run)
    meta = read_meta(checkpoint)
    target = HERE / name
    with atomic_path(target) as staging:
        staging.mkdir()
        shutil.copy2(checkpoint / "model.safetensors", staging / "model.safetensors")
        config = {**meta["config"], "out_dir": "runs", "name": name}
        write_json(staging / "meta.json", {**meta, "config": config})
    evaluation = score_task_checkpoint(target, device="cpu", sizes=sizes, count=count)
    result = evaluation.result
    entry = {
        "description": description,
        "task": result["task"], "model": result["model"], "parameters": result["parameters"],
        "trained_by": training_command(meta["config"]), "checkpoint_epoch": result["checkpoint_epoch"],
        "scored_by": f"softshare eval pretrained:{name} --sizes {' '.join(map(str, sizes))} --count {count}",
        "fold": result["fold"], "eval_iterations": result["eval_iterations"], "count": count,
        "stable_exact_match": {size: row["stable"] for size, row in result["test"].items()},
        "stable_mean_stop": {size: round(row["stable_iteration"], 1) for size, row in result["test"].items()},
    }
    write_json(HERE / "catalogue.json", {**catalogue(), name: entry})
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("name")
    parser.add_argument("description")
    parser.add_argument("--sizes", type=int, nargs="+", required=True)
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args()
    print(json.dumps(publish(args.run, args.name, args.description, args.sizes, args.count), indent=2))


if __name__ == "__main__":
    main()
