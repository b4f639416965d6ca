"""`softshare experiment algorithmic`: do soft-shared nets train faster and think longer?

The paper's second claim, measured on prefix sums (and mazes): ff, shared (k = 1, 2, 4, with and
without the recurrence regulariser) and recurrent bodies (with and without the DT-L remedy) at
equal width and iterations, all with the same recipe, several seeds each, compared on
(a) training steps and wall time until the training exact match reaches 95%,
(b) exact match on larger sizes at the label-free stopping rule and at the best iteration, with
    nets that can run longer (recurrent; shared nets folded into a loop) run up to 20x the trained
    iterations, and
(c) for shared nets, what folded at |cos| >= 0.99 and their LSM figures.
Every run goes through the ordinary trainer into its own run directory and its evaluation is
cached beside it, so rerunning the same command continues an interrupted study. Runs go to
`jobs` worker processes of one thread each (small nets run fastest that way).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..analysis.lsm import save_lsm
from ..checkpoint import find_checkpoint, load
from ..device import environment_description
from ..errors import SoftshareError
from ..eval.algorithmic import EXTRAPOLATION_FACTOR, LEARNED, STOP_PATIENCE, score_task_checkpoint
from ..fold import DEFAULT_THRESHOLD
from ..storage import figure_path, save_figure, write_json, write_text
from ..train.config import PRESETS, TrainConfig, resolve_config
from ..train.loop import train
from ..train.algorithmic import steps_per_epoch
from ..train.run_dir import read_metrics

log = logging.getLogger("softshare.experiment")

TASKS = ("mazes", "prefix-sums")
TARGET = 0.95  # training exact match that counts as "trained"
RECURRENCE_REG = 1.0  # the regulariser's weight in the *_reg variants
EVAL_VERSION = 4  # bump when the cached per-run evaluation changes meaning (4: curves kept in it)
LSM_FIGURES = "lsm-evaluated"  # a shared run's LSM figures, beside its evaluation


@dataclass(frozen=True)
class Variant:
    """One body to compare: the config overrides that select it (all else is the preset's recipe)."""

    name: str
    model: str
    num_templates: int | None = None
    recurrence_reg: float = 0.0
    lipschitz: bool = False

    def overrides(self) -> dict:
        """The fields that make a variant what its name says: the regulariser's weight, no random
        starts and no iterations trained past depth (`run_on`: a last step trained to repeat would
        make every shared variant think longer by construction). The other body defaults apply (the
        penalty's reach and sign, ff's recall start and schedule); the width is the study's."""
        extra = {"num_templates": self.num_templates} if self.num_templates else {}
        return {"model": self.model, "recurrence_reg": self.recurrence_reg, "random_state": 0.0, "run_on": 0,
                "lipschitz": self.lipschitz, **extra}

    @property
    def label(self) -> str:
        """The body in words, for figures: ``soft-shared, k = 2 + recurrence reg.``."""
        body = {"ff": "feed-forward", "recurrent": "recurrent"}.get(self.model, f"soft-shared, k = {self.num_templates}")
        return body + (" + recurrence reg." if self.recurrence_reg else "") + (", DT-L" if self.lipschitz else "")


VARIANTS = {v.name: v for v in (
    Variant("ff", "ff"),
    Variant("shared_k1", "shared", 1), Variant("shared_k2", "shared", 2), Variant("shared_k4", "shared", 4),
    # k = 1 needs no regulariser: one template makes every pair of layers collinear already
    Variant("shared_k2_reg", "shared", 2, RECURRENCE_REG), Variant("shared_k4_reg", "shared", 4, RECURRENCE_REG),
    Variant("recurrent", "recurrent"), Variant("recurrent_dtl", "recurrent", lipschitz=True),
    Variant("shared_k2_dtl", "shared", 2, lipschitz=True))}
DEFAULT_VARIANTS = ("ff", "shared_k1", "shared_k2", "shared_k2_reg", "shared_k4", "shared_k4_reg", "recurrent",
                    "recurrent_dtl")


def run_experiment(out_dir: str | Path, scale: str = "cpu", tasks: tuple[str, ...] = ("prefix-sums",),
                   variants: tuple[str, ...] = DEFAULT_VARIANTS, seeds: tuple[int, ...] = (0, 1, 2, 3, 4),
                   overrides: dict | None = None, device: str = "auto", jobs: int = 1,
                   patience: int = STOP_PATIENCE, figure_format: str = "png") -> dict:
    """Train and evaluate every (task, variant, seed); write results.json, results.md and plots.

    `overrides` are config fields applied to every run on top of the `<task>_<scale>` preset
    (e.g. ``{"epochs": 5}`` for a reduced run); they are recorded in the results.
    """
    out = Path(out_dir)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    work = plan_experiment(out, scale, tasks, variants, seeds, overrides, device, jobs, patience, figure_format)
    if jobs == 1:
        runs = [_run_one(*item) for item in work]
    else:  # one thread per worker: these nets are too small to gain from more (docs/algorithmic.md)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=torch.set_num_threads,
                                 initargs=(1,)) as pool:
            runs = list(pool.map(_run_one_logged, work))
    results = {"experiment": "algorithmic", "scale": scale, "started": started,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hardware": environment_description(device),
               "jobs": jobs, "seeds": list(seeds), "overrides": overrides or {}, "target_train_acc": TARGET,
               "fold_threshold": DEFAULT_THRESHOLD, "patience": patience, "runs": runs, "summary": summarise(runs)}
    # the curves stay in each run's study-eval.json: results.json keeps the numbers the report quotes
    write_json(out / "results.json", {**results, "runs": [{k: v for k, v in r.items() if k != "curves"}
                                                          for r in runs]})
    write_text(out / "results.md", markdown_report(results))
    for task in tasks:
        plot_training(results, task, figure_path(out / f"training_{task}", figure_format))
        plot_extrapolation(results, task, figure_path(out / f"extrapolation_{task}", figure_format))
        plot_iterations(results, task, figure_path(out / f"iterations_{task}", figure_format))
    return results


def plan_experiment(out: Path, scale: str, tasks: tuple[str, ...], variants: tuple[str, ...], seeds: tuple[int, ...],
                    overrides: dict | None, device: str, jobs: int, patience: int,
                    figure_format: str = "png") -> list[tuple]:
    """Every run's resolved config (each validated), before anything is written: (config, variant, patience)."""
    _check(scale, tasks, variants, seeds, jobs)
    figure_path("figure", figure_format)  # a bad format is refused before anything is trained
    work = []
    for task in tasks:
        preset = f"{task.replace('-', '_')}_{scale}"
        for name in variants:
            for seed in seeds:
                # every body at the preset's width (a body's own default width would make it a
                # comparison of widths, not of sharing), unless the overrides say otherwise
                fields = {"width": PRESETS[preset]["width"], **(overrides or {}), **VARIANTS[name].overrides(),
                          "seed": seed, "device": device, "name": f"{task}-{name}-s{seed}",
                          "out_dir": str(Path(out) / "runs")}
                work.append((resolve_config(preset, overrides={**fields, "figure_format": figure_format}), name,
                             patience))
    return work


def _check(scale: str, tasks, variants, seeds, jobs: int) -> None:
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
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise SoftshareError(f"jobs must be a positive integer, got {jobs!r}")


def _run_one_logged(item: tuple) -> dict:
    """`_run_one` in a worker process, its progress lines on the worker's stdout."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return _run_one(*item)


def _run_one(config: TrainConfig, variant: str, patience: int) -> dict:
    """Train (or finish training) one run, then fold (shared) and score it on every test size."""
    run_path = Path(config.out_dir) / config.run_name()
    log.info("%s: training (%d epochs)", run_path.name, config.epochs)
    result = train(config, resume="auto")
    if result.interrupted:
        raise KeyboardInterrupt
    history = read_metrics(run_path)
    per_epoch = steps_per_epoch(config)
    reached = next((row for row in history if row["train_acc"] >= TARGET), None)
    seconds = [row["seconds"] for row in history]
    record = {
        "task": config.task, "variant": variant, "seed": config.seed, "run": str(run_path),
        "model": config.model, "steps_per_epoch": per_epoch, "epochs": len(history),
        "steps_to_target": reached["epoch"] * per_epoch if reached else None,
        "seconds_to_target": round(sum(seconds[:reached["epoch"]]), 2) if reached else None,
        "train_seconds": round(sum(seconds), 2),
        "final_train_acc": history[-1]["train_acc"], "final_train_loss": history[-1]["train_loss"],
        "final_val_acc": history[-1].get("val_acc"),
        "curve": [(row["epoch"] * per_epoch, row["train_acc"]) for row in history],
        "trained_iterations": config.depth, "train_size": config.train_size,
    }
    return {**record, **evaluate_run(run_path, config, patience, config.figure_format)}


def evaluate_run(run_path: Path, config: TrainConfig, patience: int = STOP_PATIENCE,
                 figure_format: str = "png") -> dict:
    """The run's best checkpoint scored by `eval.evaluate_task` (shared nets folded to think
    longer), with the LSM of a shared net in ``lsm-evaluated/`` (drawn again when asked in another
    format); cached in ``study-eval.json`` beside the run, curves included."""
    path = run_path / "study-eval.json"
    settings = {"version": EVAL_VERSION, "sizes": config.test_sizes, "count": config.test_count,
                "patience": patience, "threshold": DEFAULT_THRESHOLD, "epochs": config.epochs}
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("settings") == settings:
            if config.model == "shared" and not any((run_path / LSM_FIGURES).glob(f"*.{figure_format}")):
                save_lsm(load(find_checkpoint(run_path)), run_path / LSM_FIGURES, figure_format)
            return cached["result"]
    # checkpoints/best: the training run chose it on validation only (train/algorithmic.py)
    log.info("%s: scoring", run_path.name)
    evaluation = score_task_checkpoint(run_path, device=config.device, sizes=config.test_sizes,
                                       count=config.test_count, patience=patience, threshold=DEFAULT_THRESHOLD,
                                       log=log)
    if evaluation.result["fold"] is not None:
        save_lsm(evaluation.model, run_path / LSM_FIGURES, figure_format)
    found = evaluation.result
    result = {"parameters": found["parameters"], "checkpoint": Path(found["checkpoint"]).name,
              "checkpoint_epoch": found["checkpoint_epoch"], **({"fold": found["fold"]} if found["fold"] else {}),
              "eval_iterations": found["eval_iterations"], "test": found["test"], "curves": found["accuracy"]}
    write_json(path, {"settings": settings, "result": result})
    return result


# -- summary and report -------------------------------------------------------------------------
RULES = ("at_trained", "stable", "best")  # the exact-match columns reported per size
RULE_NAMES = {"at_trained": "after the trained iterations", "stable": "at the stable stopping rule",
              "best": "at the best iteration (an oracle: it looks at the labels)"}
SOLVED = 0.9  # exact match at which a seed counts as solving a size


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
        sizes = list(group[0]["test"])
        row = {
            "task": key[0], "variant": key[1], "seeds": len(group), "parameters": group[0]["parameters"],
            "reached_target": len(hit),
            "steps_to_target": _mean_std([r["steps_to_target"] for r in hit]),
            "seconds_to_target": _mean_std([r["seconds_to_target"] for r in hit]),
            "final_train_acc": _mean_std([r["final_train_acc"] for r in group]),
            "eval_iterations": group[0]["eval_iterations"],
            "test": {rule: {s: _mean_std([r["test"][s][rule] for r in group]) for s in sizes} for rule in RULES},
            "solved": {rule: {s: sum(r["test"][s][rule] >= SOLVED for r in group) for s in sizes} for rule in RULES},
        }
        if "fold" in group[0]:
            row["fold"] = {"one_loop": sum(len(r["fold"]["loops"]) == 1 for r in group),
                           "runs_longer": sum(r["fold"]["runs_longer"] for r in group),
                           "loops": _mean_std([len(r["fold"]["loops"]) for r in group])}
        rows.append(row)
    return rows


def _fmt(stat, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if stat is None else f"{stat[0] * scale:.{digits}f} ± {stat[1] * scale:.{digits}f}"


def markdown_report(results: dict) -> str:
    """(a) time to 95% training exact match, (b) exact match per size, (c) folding; per seed too."""
    lines = [f"# Algorithmic experiment ({results['scale']} scale)", "",
             f"- started {results['started']}, finished {results['finished']}, {results['jobs']} worker(s) of one "
             f"thread", f"- hardware: {results['hardware']}",
             f"- seeds: {results['seeds']}; overrides of the presets: {results['overrides'] or 'none'}",
             f"- stopping rule: a prediction unchanged for {results['patience']} iterations (no labels); nets that "
             f"run longer (recurrent, shared folded into a loop) are scored up to {EXTRAPOLATION_FACTOR}x the trained "
             f"iterations (a net below {100 * LEARNED:.0f}% exact match at the training size both after its trained "
             f"iterations and at the stable rule is scored at its trained iterations only)",
             "- every net is scored from its best checkpoint, chosen on held-out validation data only: exact match at "
             "the run's select_size at the stable rule, then at the training size (without select_size: at the "
             "training size alone); ties go to the later epoch",
             "- mean ± std over seeds; time to target over the seeds that reached it", ""]
    for task in dict.fromkeys(r["task"] for r in results["summary"]):
        rows = [r for r in results["summary"] if r["task"] == task]
        runs = [r for r in results["runs"] if r["task"] == task]
        sizes = list(rows[0]["test"]["stable"])
        lines += [f"## {task}", "", f"(a) training until {100 * results['target_train_acc']:.0f}% training exact "
                  f"match (first epoch whose mean reaches it)", "",
                  "| model | params | reached | steps | seconds | final train acc (%) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            lines.append(f"| {r['variant']} | {r['parameters']:,} | {r['reached_target']}/{r['seeds']} | "
                         f"{_fmt(r['steps_to_target'], digits=0)} | {_fmt(r['seconds_to_target'])} | "
                         f"{_fmt(r['final_train_acc'], 100)} |")
        for rule in RULES:
            lines += ["", f"(b) test exact match (%) {RULE_NAMES[rule]}; in brackets: seeds at >= "
                      f"{100 * SOLVED:.0f}%", "",
                      "| model | " + " | ".join(f"{s}" for s in sizes) + " |", "| --- |" + " ---: |" * len(sizes)]
            for r in rows:
                cells = " | ".join(f"{_fmt(r['test'][rule][s], 100)} ({r['solved'][rule][s]}/{r['seeds']})"
                                   for s in sizes)
                lines.append(f"| {r['variant']} | {cells} |")
        lines += ["", f"(c) folding the shared nets at |cos| >= {results['fold_threshold']}", "",
                  "| run | loops | params before -> after | exact match before -> after (train size) | runs longer |",
                  "| --- | --- | ---: | ---: | --- |"]
        for run in (r for r in runs if "fold" in r):
            fold = run["fold"]
            lines.append(f"| {run['variant']} s{run['seed']} | {fold['loops']} | {run['parameters']:,} -> "
                         f"{fold['params_after']:,} | {100 * fold['acc_before']:.1f} -> {100 * fold['acc_after']:.1f} | "
                         f"{'yes' if fold['runs_longer'] else 'no'} |")
        lines += ["", "Per seed: exact match (%) at the stable rule (mean stop iteration)", "",
                  "| run | params | steps to target | " + " | ".join(sizes) + " |",
                  "| --- | ---: | ---: |" + " ---: |" * len(sizes)]
        for run in runs:
            cells = " | ".join(f"{100 * run['test'][s]['stable']:.1f} ({run['test'][s]['stable_iteration']:.0f})"
                               for s in sizes)
            lines.append(f"| {run['variant']} s{run['seed']} | {run['parameters']:,} | "
                         f"{run['steps_to_target'] if run['steps_to_target'] is not None else '-'} | {cells} |")
        lines.append("")
    return "\n".join(lines)


COLOURS = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9", "C7"]  # grey last: thin lines are grey-ish


def variant_label(name: str) -> str:
    """A variant's body in words (its code name when it is not a known variant)."""
    return VARIANTS[name].label if name in VARIANTS else name


def _task_words(task: str) -> str:
    return task.replace("-", " ")


def _legend(ax, extra: list[tuple[dict, str]]) -> None:
    """The axes' legend plus lines that say what the styles mean, to the right of the plot."""
    for style, text in extra:
        ax.plot([], [], label=text, **style)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def plot_training(results: dict, task: str, path: Path) -> None:
    """Training exact match against steps: each seed a thin line, the mean over seeds a thick one."""
    fig = Figure(figsize=(9.5, 4.5), layout="constrained")
    ax = fig.subplots()
    variants = list(dict.fromkeys(r["variant"] for r in results["runs"] if r["task"] == task))
    seeds = 0
    for index, variant in enumerate(variants):
        runs = [r for r in results["runs"] if r["task"] == task and r["variant"] == variant]
        seeds = max(seeds, len(runs))
        colour = COLOURS[index % len(COLOURS)]
        for run in runs:
            steps, acc = zip(*run["curve"])
            ax.plot(steps, [100 * a for a in acc], color=colour, alpha=0.3, lw=0.8)
        length = min(len(r["curve"]) for r in runs)
        steps = [runs[0]["curve"][i][0] for i in range(length)]
        mean = [100 * statistics.fmean(r["curve"][i][1] for r in runs) for i in range(length)]
        ax.plot(steps, mean, color=colour, lw=2, label=variant_label(variant))
    target = 100 * results["target_train_acc"]
    ax.axhline(target, color="grey", ls="--", lw=1)
    ax.set(xlabel="training steps", ylabel="training exact match (%)", ylim=(-2, 102),
           title=f"{_task_words(task)}: learning the training size")
    ax.grid(alpha=0.3)
    _legend(ax, [(dict(color="black", lw=2), f"thick: mean over {seeds} seeds"),
                 (dict(color="black", lw=0.8, alpha=0.3), "thin: one seed"),
                 (dict(color="grey", ls="--", lw=1), f"{target:.0f}%: counted as trained")])
    save_figure(fig, path)


def plot_extrapolation(results: dict, task: str, path: Path) -> None:
    """Exact match at the stopping rule against size: mean ± std band per variant, seeds as dots."""
    fig = Figure(figsize=(9.5, 4.5), layout="constrained")
    ax = fig.subplots()
    rows = [r for r in results["summary"] if r["task"] == task]
    sizes = [int(s) for s in rows[0]["test"]["stable"]]
    for index, row in enumerate(rows):
        colour = COLOURS[index % len(COLOURS)]
        offset = 1 + 0.012 * (index - len(rows) / 2)  # keep coinciding lines and dots apart
        xs = [s * offset for s in sizes]
        mean = [100 * row["test"]["stable"][str(s)][0] for s in sizes]
        std = [100 * row["test"]["stable"][str(s)][1] for s in sizes]
        ax.plot(xs, mean, "-", color=colour, lw=1.8, label=f"{variant_label(row['variant'])} ({row['seeds']} seeds)")
        ax.fill_between(xs, [max(0.0, m - d) for m, d in zip(mean, std)],
                        [min(100.0, m + d) for m, d in zip(mean, std)], color=colour, alpha=0.12)
        for run in (r for r in results["runs"] if r["task"] == task and r["variant"] == row["variant"]):
            ax.plot(xs, [100 * run["test"][str(s)]["stable"] for s in sizes], ".", color=colour, ms=4, alpha=0.7)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    unit = "bits" if task == "prefix-sums" else "maze side"
    train_size = results["runs"][0].get("train_size", sizes[0])
    ax.set(xlabel=f"test size ({unit}; trained at {train_size})", ylabel="exact match at the stopping rule (%)",
           ylim=(-2, 102), title=f"{_task_words(task)}: extrapolation to larger sizes")
    ax.grid(alpha=0.3)
    _legend(ax, [(dict(color="black", lw=1.8), "line: mean over seeds"),
                 (dict(color="grey", alpha=0.25, lw=6), "band: mean ± 1 std"),
                 (dict(color="black", ls="none", marker=".", ms=5), "dot: one seed")])
    save_figure(fig, path)


def plot_iterations(results: dict, task: str, path: Path) -> None:
    """Exact match on the largest size against iterations: one line per seed of every variant
    that runs longer than trained; a dot where the stopping rule stops."""
    runs = [r for r in results["runs"] if r["task"] == task and r["eval_iterations"] > r["trained_iterations"]]
    fig = Figure(figsize=(9.5, 4.5), layout="constrained")
    ax = fig.subplots()
    if not runs:
        ax.text(0.5, 0.5, "no net ran longer than trained", ha="center", va="center", transform=ax.transAxes)
    size = str(max(int(s) for s in runs[0]["test"])) if runs else ""
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    for run in runs:
        curve = run["curves"][size]
        colour = COLOURS[variants.index(run["variant"]) % len(COLOURS)]
        first = run["seed"] == min(r["seed"] for r in runs if r["variant"] == run["variant"])
        seeds = sum(r["variant"] == run["variant"] for r in runs)
        ax.plot(range(1, len(curve) + 1), [100 * a for a in curve], color=colour, lw=1, alpha=0.8,
                label=f"{variant_label(run['variant'])} ({seeds} seed{'s' if seeds > 1 else ''})" if first else None)
        ax.plot(run["test"][size]["stable_iteration"], 100 * run["test"][size]["stable"], "o", color=colour, ms=5,
                markeredgecolor="black", markeredgewidth=0.5)
    extra = []
    if runs:
        trained = runs[0]["trained_iterations"]
        ax.axvline(trained, color="grey", ls="--", lw=1)
        extra = [(dict(color="black", lw=1), "one line per seed"),
                 (dict(color="white", ls="none", marker="o", markeredgecolor="black", ms=5),
                  "where the stopping rule stops (mean)"),
                 (dict(color="grey", ls="--", lw=1), f"trained iterations ({trained})")]
    ax.set(xlabel="iterations", ylabel=f"exact match at size {size} (%)", ylim=(-2, 102),
           title=f"{_task_words(task)}: thinking longer than trained, at size {size}")
    ax.grid(alpha=0.3)
    if runs:
        _legend(ax, extra)
    save_figure(fig, path)
