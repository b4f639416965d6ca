"""`softshare experiment algorithmic`: do soft-shared nets train faster and extrapolate further?

The paper's second claim, measured on mazes and prefix sums: ff, shared (k = 1, 2, 4) and
recurrent bodies at equal depth/iterations and width, several seeds each, compared on
(a) training steps and wall time until the training exact match reaches 95% and
(b) exact match on test sizes larger than the training size. Every run goes through the
ordinary training loop (`softshare.train.loop.train`) into its own run directory, so an
interrupted experiment continues where it stopped when rerun with the same arguments.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from ..checkpoint import load
from ..data.tasks import evaluation_examples
from ..device import environment_description, resolve_device
from ..errors import SoftshareError
from ..eval.algorithmic import evaluate_task_checkpoint, exact_match_thinking_longer
from ..fold import DEFAULT_THRESHOLD, fold_model
from ..io import save_figure, write_json, write_text
from ..train.config import resolve_config
from ..train.loop import train
from ..train.run_dir import read_metrics

log = logging.getLogger("softshare.experiment")

TASKS = ("mazes", "prefix-sums")
TARGET = 0.95  # training exact match that counts as "trained"


@dataclass(frozen=True)
class Variant:
    """One body to compare: the config overrides that select it."""

    name: str
    model: str
    num_templates: int | None = None
    recall: bool = False

    def overrides(self) -> dict:
        extra = {"num_templates": self.num_templates} if self.num_templates else {}
        return {"model": self.model, "model_args": {"recall": True} if self.recall else {}, **extra}


VARIANTS = {v.name: v for v in (Variant("ff", "ff"), Variant("shared_k1", "shared", 1),
                                 Variant("shared_k2", "shared", 2), Variant("shared_k4", "shared", 4),
                                 Variant("recurrent", "recurrent"),
                                 Variant("recurrent_recall", "recurrent", recall=True))}
# recurrent_recall (Bansal et al.'s input injection) is optional: it adds a conv the others lack.
DEFAULT_VARIANTS = ("ff", "shared_k1", "shared_k2", "shared_k4", "recurrent")
# Test-time iterations of the recurrent body (ff/shared stop at their depth), per scale and task:
# enough for the larger sizes to be solvable in principle where the budget allows.
EVAL_ITERATIONS = {("cpu", "mazes"): 64, ("cpu", "prefix-sums"): 512,
                   ("gpu", "mazes"): 300, ("gpu", "prefix-sums"): 1024}


def run_experiment(out_dir: str | Path, scale: str = "cpu", tasks: tuple[str, ...] = TASKS,
                   variants: tuple[str, ...] = DEFAULT_VARIANTS, seeds: tuple[int, ...] = (0, 1, 2),
                   overrides: dict | None = None, device: str = "auto") -> dict:
    """Train and evaluate every (task, variant, seed); write results.json, results.md and plots.

    `overrides` are config fields applied to every run on top of the `<task>_<scale>` preset
    (e.g. ``{"epochs": 5}`` for a reduced run); they are recorded in the results.
    """
    _check(scale, tasks, variants, seeds)
    out = Path(out_dir)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    runs = []
    for task in tasks:
        preset = f"{task.replace('-', '_')}_{scale}"
        for name in variants:
            for seed in seeds:
                fields = {**(overrides or {}), **VARIANTS[name].overrides(), "seed": seed, "device": device,
                          "name": f"{task}-{name}-s{seed}", "out_dir": str(out / "runs")}
                config = resolve_config(preset, overrides=fields)
                runs.append(_run_one(config, name, EVAL_ITERATIONS[scale, task]))
    results = {"experiment": "algorithmic", "scale": scale, "started": started,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hardware": environment_description(device),
               "seeds": list(seeds), "overrides": overrides or {}, "target_train_acc": TARGET,
               "runs": runs, "summary": summarise(runs)}
    write_json(out / "results.json", results)
    write_text(out / "results.md", markdown_report(results))
    for task in tasks:
        plot_training(results, task, out / f"training_{task}.png")
        plot_extrapolation(results, task, out / f"extrapolation_{task}.png")
    return results


def _check(scale: str, tasks, variants, seeds) -> None:
    if scale not in ("cpu", "gpu"):
        raise SoftshareError(f"scale must be cpu or gpu, got {scale!r}")
    for task in tasks:
        if task not in TASKS:
            raise SoftshareError(f"unknown task {task!r}; use {' or '.join(TASKS)}")
    for name in variants:
        if name not in VARIANTS:
            raise SoftshareError(f"unknown variant {name!r}; use some of {', '.join(VARIANTS)}")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SoftshareError(f"seeds must be distinct non-negative integers, got {list(seeds)}")


def _run_one(config, variant: str, recurrent_iterations: int) -> dict:
    """Train (or finish training) one run, then score its last checkpoint on every test size."""
    run_path = Path(config.out_dir) / config.run_name()
    log.info("%s: training (%d epochs)", run_path.name, config.epochs)
    result = train(config, resume="auto")
    if result.interrupted:
        raise KeyboardInterrupt
    history = read_metrics(run_path)
    iterations = recurrent_iterations if config.model == "recurrent" else config.depth
    eval_path = run_path / "eval-last.json"
    evaluation = _cached_eval(eval_path, config.test_sizes, iterations, config.test_count)
    if evaluation is None:
        log.info("%s: evaluating sizes %s up to %d iterations", run_path.name, config.test_sizes, iterations)
        evaluation = evaluate_task_checkpoint(str(run_path / "checkpoints" / "last"), sizes=config.test_sizes,
                                              iterations=iterations, count=config.test_count,
                                              device=config.device, out=str(eval_path))
    steps_per_epoch = config.train_count // config.batch_size
    reached = next((row for row in history if row["train_acc"] >= TARGET), None)
    seconds = [row["seconds"] for row in history]
    accuracy = evaluation["accuracy"]
    record = {
        "task": config.task, "variant": variant, "seed": config.seed, "run": str(run_path),
        "model": evaluation["model"], "parameters": _parameters(run_path),
        "steps_per_epoch": steps_per_epoch, "epochs": len(history),
        "steps_to_target": reached["epoch"] * steps_per_epoch if reached else None,
        "seconds_to_target": round(sum(seconds[:reached["epoch"]]), 2) if reached else None,
        "train_seconds": round(sum(seconds), 2),
        "final_train_acc": history[-1]["train_acc"], "final_train_loss": history[-1]["train_loss"],
        "final_val_acc": history[-1].get("val_acc"),
        "curve": [(row["epoch"] * steps_per_epoch, row["train_acc"]) for row in history],
        "trained_iterations": config.depth, "eval_iterations": iterations,
        "test_at_trained": {size: acc[config.depth - 1] for size, acc in accuracy.items()},
    }
    if config.model == "recurrent":
        record["test_at_scaled"] = {size: acc[scaled_iterations(config, int(size), iterations) - 1]
                                    for size, acc in accuracy.items()}
        record["test_at_max"] = {size: acc[-1] for size, acc in accuracy.items()}
    elif config.model == "shared":
        folded = _folded_eval(run_path, config, recurrent_iterations, record["test_at_trained"])
        record["folded_loops"], record["test_at_scaled"] = folded["loops"], folded["accuracy"]
    return record


def _folded_eval(run_path: Path, config, most: int, unfolded: dict[str, float]) -> dict:
    """Fold the shared net's collinear blocks into loops (`softshare.fold`) and let its longest
    loop run longer, so the iterations scale with the size as the recurrent net's do.

    A net with no loop of 2 or more blocks cannot run longer: it keeps its unfolded accuracy.
    Cached in ``eval-folded.json``.
    """
    path = run_path / "eval-folded.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if list(cached["accuracy"]) == list(unfolded) and cached["count"] == config.test_count:
            return cached
    device = resolve_device(config.device)
    folded = fold_model(load(run_path / "checkpoints" / "last", device=device), DEFAULT_THRESHOLD).model
    loops = [block.length for block in folded.blocks]
    accuracy = dict(unfolded)
    if max(loops) >= 2:
        log.info("%s: folded into loops %s; evaluating with scaled iterations", run_path.name, loops)
        for size in unfolded:
            extra = max(0, scaled_iterations(config, int(size), most) - config.depth)
            x, y = evaluation_examples(config.to_dict(), int(size), config.test_count)
            accuracy[size] = exact_match_thinking_longer(folded, config.task, x, y, extra, 100, device)[-1]
    result = {"threshold": DEFAULT_THRESHOLD, "loops": loops, "count": config.test_count, "accuracy": accuracy}
    write_json(path, result)
    return result


def scaled_iterations(config, size: int, most: int) -> int:
    """Iterations in proportion to the instance size, ``ceil(T * size / train_size)``, at most `most`."""
    return min(most, -(-config.depth * size // config.train_size))


def _cached_eval(path: Path, sizes: list[int], iterations: int, count: int) -> dict | None:
    """A previous evaluation of the same final checkpoint with the same settings, if any."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    same = (list(result["accuracy"]) == [str(s) for s in sizes] and len(result["iterations"]) == iterations
            and result["count"] == count)
    return result if same else None


def _parameters(run_path: Path) -> int:
    return sum(p.numel() for p in load(run_path / "checkpoints" / "last").parameters())


# -- summary and report -------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict]) -> list[dict]:
    """Mean and std over seeds per (task, variant); time-to-target over the seeds that reached it."""
    rows = []
    for key in dict.fromkeys((r["task"], r["variant"]) for r in runs):
        group = [r for r in runs if (r["task"], r["variant"]) == key]
        hit = [r for r in group if r["steps_to_target"] is not None]
        sizes = list(group[0]["test_at_trained"])
        rows.append({
            "task": key[0], "variant": key[1], "seeds": len(group), "parameters": group[0]["parameters"],
            "reached_target": len(hit),
            "steps_to_target": _mean_std([r["steps_to_target"] for r in hit]),
            "seconds_to_target": _mean_std([r["seconds_to_target"] for r in hit]),
            "final_train_acc": _mean_std([r["final_train_acc"] for r in group]),
            "final_train_loss": _mean_std([r["final_train_loss"] for r in group]),
            "trained_iterations": group[0]["trained_iterations"], "eval_iterations": group[0]["eval_iterations"],
            "test_at_trained": {s: _mean_std([r["test_at_trained"][s] for r in group]) for s in sizes},
            **{key: {s: _mean_std([r[key][s] for r in group]) for s in sizes}
               for key in ("test_at_scaled", "test_at_max") if key in group[0]},
        })
    return rows


def _fmt(stat, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if stat is None else f"{stat[0] * scale:.{digits}f} ± {stat[1] * scale:.{digits}f}"


def markdown_report(results: dict) -> str:
    """Tables (a) time to 95% training exact match and (b) test exact match per size."""
    lines = [f"# Algorithmic experiment ({results['scale']} scale)", "",
             f"- started {results['started']}, finished {results['finished']}",
             f"- hardware: {results['hardware']}",
             f"- seeds: {results['seeds']}; overrides of the presets: {results['overrides'] or 'none'}",
             "- mean ± std over seeds; time to target over the seeds that reached it", ""]
    for task in dict.fromkeys(r["task"] for r in results["summary"]):
        rows = [r for r in results["summary"] if r["task"] == task]
        lines += [f"## {task}", "", f"(a) training until {100 * results['target_train_acc']:.0f}% training "
                  f"exact match (first epoch whose mean reaches it)", "",
                  "| model | params | reached | steps | seconds | final train acc (%) | final train loss |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            lines.append(f"| {r['variant']} | {r['parameters']:,} | {r['reached_target']}/{r['seeds']} | "
                         f"{_fmt(r['steps_to_target'], digits=0)} | {_fmt(r['seconds_to_target'])} | "
                         f"{_fmt(r['final_train_acc'], 100)} | {_fmt(r['final_train_loss'], digits=4)} |")
        sizes = list(rows[0]["test_at_trained"])
        trained = rows[0]["trained_iterations"]
        lines += ["", f"(b) test exact match (%) per size after the trained {trained} iterations; "
                  f"\"scaled\": after ceil({trained} * size / train size) iterations (recurrent: looped longer; "
                  f"shared: folded into loops at |cos| >= {DEFAULT_THRESHOLD}, longest loop run longer); "
                  f"recurrent also after the most evaluated", "",
                  "| model | iterations | " + " | ".join(f"size {s}" for s in sizes) + " |",
                  "| --- | --- |" + " ---: |" * len(sizes)]
        for r in rows:
            shown = [(str(trained), "test_at_trained"), ("scaled", "test_at_scaled"),
                     (str(r["eval_iterations"]), "test_at_max")]
            for label, key in shown:
                if key in r:
                    cells = " | ".join(_fmt(r[key][s], 100) for s in sizes)
                    lines.append(f"| {r['variant']} | {label} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def plot_training(results: dict, task: str, path: Path) -> None:
    """Training exact match against steps, one line per seed, one colour per variant."""
    fig = Figure(figsize=(7, 4), layout="tight")
    ax = fig.subplots()
    colours = {}
    for run in (r for r in results["runs"] if r["task"] == task):
        steps, acc = zip(*run["curve"])
        colour = colours.setdefault(run["variant"], f"C{len(colours)}")
        ax.plot(steps, [100 * a for a in acc], color=colour, alpha=0.8,
                label=run["variant"] if run["seed"] == results["seeds"][0] else None)
    ax.axhline(100 * results["target_train_acc"], color="grey", ls="--", lw=1)
    ax.set(xlabel="training steps", ylabel="training exact match (%)", title=f"{task}: training", ylim=(-2, 102))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_extrapolation(results: dict, task: str, path: Path) -> None:
    """Test exact match against size (mean ± std); dashed: iterations scaled to the size."""
    fig = Figure(figsize=(7, 4), layout="tight")
    ax = fig.subplots()
    for index, row in enumerate(r for r in results["summary"] if r["task"] == task):
        sizes = [int(s) for s in row["test_at_trained"]]
        for key, style, suffix in (("test_at_trained", "-o", ""), ("test_at_scaled", "--x", " (scaled iterations)")):
            if key not in row:
                continue
            mean = [100 * row[key][str(s)][0] for s in sizes]
            std = [100 * row[key][str(s)][1] for s in sizes]
            ax.errorbar(sizes, mean, yerr=std, fmt=style, color=f"C{index}", capsize=3, label=row["variant"] + suffix)
    ax.set(xscale="log", xlabel="test size (log scale)", ylabel="test exact match (%)", ylim=(-2, 102),
           title=f"{task}: extrapolation (trained at the smallest size)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
