"""`softshare lsm RUN_OR_CHECKPOINT`: layer similarity heatmaps of a trained model."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from ..analysis import (
    LSM_DIR,
    layer_similarity,
    pairs_over_training,
    plot_dynamics,
    plot_lsm_history,
    read_lsm_history,
    save_lsm,
    short_layer_names,
)
from ..analysis.dynamics import DYNAMICS_FIGURE, FOLD_LEVELS
from ..checkpoint import find_checkpoint, load
from ..errors import SoftshareError
from ..storage import FIGURE_FORMATS, check_output, exclusive_lock, figure_path, mark_output, output_lock
from ..train.run_dir import is_run
from ._common import add_figure_format, add_overwrite, format_table



def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lsm", description="Draw, for every template bank, S_ij = |cos(a_i, a_j)| between its layers' coefficient "
                    "vectors (1 = the same layer up to scale), and save the matrices as lsm.json. For a run "
                    "directory trained with --lsm-every, also redraw the history across epochs.")
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT",
                   help="run directory (best checkpoint, else last), checkpoint directory or model.safetensors")
    p.add_argument("--out", metavar="DIR", help="output directory (default for a run directory: RUN/lsm)")
    add_overwrite(p, "--out")
    add_figure_format(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    is_run_dir = path.is_dir() and find_checkpoint(path) != path
    if args.out is None and not is_run_dir:
        raise SoftshareError(f"{path} is a checkpoint, not a run directory; say where the figures go with --out DIR")
    out = Path(args.out) if args.out else path / LSM_DIR
    inside = is_run_dir and is_run(path) and out.resolve().is_relative_to(path.resolve())
    if not inside:  # the run's own lsm/ is this job's place; anywhere else must be new or ours
        check_output(out, "lsm", overwrite=args.overwrite, legacy=_written_by_softshare)
    # one writer: training holds its run's lock (lsm/ is training's too); elsewhere a lock beside --out
    lock = (exclusive_lock(path, "run", "wait for its training to end, or pass --out DIR outside the run")
            if inside else output_lock(out, "LSM output"))
    with lock:
        model = load(path)
        written = save_lsm(model, out, args.figure_format)
        history = read_lsm_history(path) if is_run_dir else []
        if history:  # drawn into --out too: never into a run it was not asked to
            written.append(plot_lsm_history(path, figure_format=args.figure_format, out_dir=out))
        with_coefficients = bool(history) and all("coefficients" in b for b in history[-1]["banks"])
        over_training = pairs_over_training(path) if with_coefficients else []
        if over_training:
            written.append(plot_dynamics(path, figure_path(out / DYNAMICS_FIGURE, args.figure_format)))
        mark_output(out, "lsm", files=[p.name for p in written])
    for similarity in layer_similarity(model):
        names = short_layer_names(similarity.layers)
        rows = [[name, *(f"{v:.2f}" for v in row)] for name, row in zip(names, similarity.matrix.tolist())]
        print(f"{similarity.bank}:")
        print(format_table(["", *names], rows) + "\n")
    if over_training:
        print(_pairs_table(over_training))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _pairs_table(rows: list[dict]) -> str:
    """The coefficient history as folding sees it, beside what the same movement in random
    directions would give (the drift control)."""
    levels = " / ".join(str(level) for level in FOLD_LEVELS)
    table = format_table(
        ["epoch", f"pairs >= {levels}", "mean |cos|", "|cos| to start", f"control: mean, pairs >= {levels}"],
        [[row["epoch"], " / ".join(str(row[f"at_{level}"]) for level in FOLD_LEVELS) + f" of {row['pairs']}",
          f"{row['mean']:.3f}", f"{row['cos_to_start']:.3f}",
          f"{row['drift_mean']:.3f}, " + " / ".join(f"{row[f'drift_at_{level}']:.1f}" for level in FOLD_LEVELS)
          if "drift_mean" in row else "-"] for row in rows])
    return ("foldable pairs (the same role in consecutive blocks: what a fold needs collinear) over training; "
            "control: each layer turned by its measured angle from the start, in a random direction "
            "(mean of 200 draws):\n" + table + "\n")


def _written_by_softshare(out: Path) -> bool:
    """An LSM directory of a version before markers (or a run's lsm/ written by `train --lsm-every`):
    softshare's matrices in lsm.json or history.jsonl, and its figures, nothing else (proof by
    content, not by the files' names)."""
    for entry in out.iterdir():
        figures = entry.is_dir() and re.fullmatch(r"epoch_\d{4}", entry.name) and all(
            _is_figure(p) for p in entry.iterdir())
        if not (figures or entry.name in ("lsm.json", "history.jsonl") or _is_figure(entry)):
            return False
    try:
        records = [json.loads((out / "lsm.json").read_text())] if (out / "lsm.json").exists() else []
        if (out / "history.jsonl").exists():
            records += [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line.strip()]
        return bool(records) and all(_lsm_banks(record["banks"]) for record in records)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _is_figure(path: Path) -> bool:
    return path.suffix.lstrip(".") in FIGURE_FORMATS


def _lsm_banks(banks: object) -> bool:
    return isinstance(banks, list) and bool(banks) and all(
        isinstance(b, dict) and {"bank", "layers", "matrix"} <= set(b) for b in banks)
