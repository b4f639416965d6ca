"""`softshare demo` / `make demo`: nets that learn an algorithm and think longer, in minutes on a CPU.

Prefix sums (running parity of bit strings): train four nets of one recipe side by side on
32-bit strings (a recurrent DeepThinking net, a soft-shared net with one template per conv role,
one with two, whose loops are found in training, and the feed-forward control), show their
parameters and training curves, the shared nets' Layer Similarity Matrices (the k = 2 net's over
training) and what folds into a loop, then score all on strings up to 512 bits at the label-free
stopping rule, letting the nets that can (recurrent, shared folded into a loop) think up to 20x
longer than trained -> `runs/demo/report.md`. The seed is fixed and reported; docs/algorithmic.md
says how the study's seeds came out.
"""

from __future__ import annotations

import json

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..analysis.lsm import HISTORY_FIGURE, LSM_DIR, save_lsm
from ..device import environment_description
from ..errors import SoftshareError
from ..eval.algorithmic import EXTRAPOLATION_FACTOR, STOP_PATIENCE, score_task_checkpoint
from ..fold import DEFAULT_THRESHOLD
from ..storage import (FIGURE_FORMATS, check_output, figure_path, output_lock, rebuild_dir, save_figure, write_json,
                       write_text)
from ..train.algorithmic import steps_per_epoch
from ..train.config import TrainConfig, resolve_config
from ..train.run_dir import read_metrics
from .algorithmic import LSM_FIGURES

log = logging.getLogger("softshare.experiment")

NETS = ("recurrent", "shared", "shared_kn", "ff")


def net_labels(config: dict) -> dict[str, str]:
    """What each net is called in the figures and the report (a demo config's fields as a dict)."""
    return {"recurrent": "recurrent", "shared": f"soft-shared k={config['num_templates']} (folded)",
            "shared_kn": f"soft-shared k={config['kn_templates']} (folded)", "ff": "feed-forward"}


@dataclass
class DemoConfig:
    """Defaults: the prefix_sums_cpu recipe (measured: 865 s of training and scoring for the four nets on
    the 2-core machine with two other runs beside it, README); flags scale it."""

    out: str = "runs/demo"
    train_count: int = 8000
    test_count: int = 100
    test_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    width: int = 32
    depth: int = 30
    num_templates: int = 1  # one template per conv role: it folds into one loop (the study: 5/5 seeds)
    # the second soft-shared net: several templates and the k >= 2 recipe (the signed pull, random
    # starts, run_on with its last layer's mix fixed), whose loops are found in training
    kn_templates: int = 2
    kn_lsm_every: int = 3  # its LSM over training, every this many epochs (the figure of loops appearing)
    epochs: int = 30
    recurrence_reg: float = 0.0  # k = 1 needs none: every pair of its layers is collinear
    patience: int = STOP_PATIENCE
    seed: int = 0
    device: str = "cpu"
    figure_format: str = "png"  # png | pdf | svg


def _say(message: str) -> None:
    print(message, flush=True)


def run_demo(config: DemoConfig, overwrite: bool = False) -> Path:
    """Run every step into `config.out`; a failed or interrupted demo leaves the previous output.

    `config.out` must be new, empty or an earlier demo's output, unless `overwrite`."""
    started = time.perf_counter()
    figure_path(config.out, config.figure_format)  # a bad format is refused before anything is written
    out = check_output(config.out, "demo", overwrite=overwrite, legacy=_written_by_softshare)
    # resolved (and validated) before anything is written; the output is built in place at `out`
    configs = {kind: _train_config(config, kind, out / "runs") for kind in NETS}
    labels = net_labels(config.__dict__)
    with output_lock(out, "demo output"), rebuild_dir(out, "demo", DEMO_FILES) as work:
        _say(f"[1/4] training four nets on {config.train_count} {configs['shared'].train_size}-bit strings side by "
             f"side (width {config.width}, {config.depth} iterations, {config.epochs} epochs, seed {config.seed})")
        _train_side_by_side(configs, config.device)

        _say(f"[2/4] folding the shared nets at |cos| >= {DEFAULT_THRESHOLD}, then scoring every net on "
             f"{config.test_count} strings per size {config.test_sizes} (nets that run longer: up to "
             f"{EXTRAPOLATION_FACTOR * config.depth} iterations)")
        evaluations, curves, lsm = {}, {}, {}
        for kind in NETS:
            # each net from its best checkpoint by validation exact match; the shared nets folded
            evaluation = score_task_checkpoint(work / "runs" / kind, device=config.device, patience=config.patience,
                                               log=log)
            if kind.startswith("shared"):
                lsm[kind] = sorted(p.name for p in save_lsm(evaluation.model, work / "runs" / kind / LSM_FIGURES,
                                                            config.figure_format) if p.suffix != ".json")
            found = evaluation.result
            curves[kind] = found["accuracy"]
            evaluations[kind] = {key: found[key] for key in ("parameters", "checkpoint_epoch", "fold",
                                                             "eval_iterations", "test")}
            row = found["test"]
            _say(f"      {labels[kind]:26s} " + "  ".join(f"{s}: {100 * row[s]['stable']:5.1f}%" for s in row))

        _say("[3/4] figures")
        histories = {kind: read_metrics(work / "runs" / kind) for kind in NETS}
        figures = {name: figure_path(work / name, config.figure_format).name for name in ("thinking", "training")}
        _plot_training(histories, configs, labels, work / figures["training"])
        _plot_thinking(curves, evaluations, config, labels, work / figures["thinking"])

        results = {"config": config.__dict__, "evaluations": evaluations,
                   "seconds": round(time.perf_counter() - started, 1),
                   "hardware": environment_description(config.device), "torch": torch.__version__}
        write_json(work / "results.json", results)
        _say("[4/4] report")
        write_text(work / "report.md", _report(results, lsm, figures))
    _say(f"done in {time.perf_counter() - started:.0f} s: {out / 'report.md'}")
    return out / "report.md"


DEMO_FILES = ("report.md", "results.json", "runs",  # all a demo writes, its figures in any format
              *(f"{name}.{ext}" for name in ("training", "thinking") for ext in FIGURE_FORMATS))


def _written_by_softshare(out: Path) -> bool:
    """A demo directory of a version before markers: its results.json is a demo's (its config
    holds exactly DemoConfig's fields), and it holds only what a demo writes (proof by content)."""
    if any(p.name not in DEMO_FILES for p in out.iterdir()):
        return False
    try:
        results = json.loads((out / "results.json").read_text())
        return set(results["config"]) == set(DemoConfig.__dataclass_fields__) and "evaluations" in results
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _train_config(config: DemoConfig, kind: str, runs: Path) -> TrainConfig:
    overrides = dict(model="shared" if kind == "shared_kn" else kind, width=config.width, depth=config.depth,
                     epochs=config.epochs, train_count=config.train_count, test_count=config.test_count,
                     test_sizes=config.test_sizes, seed=config.seed, out_dir=str(runs), name=kind, device=config.device,
                     figure_format=config.figure_format)
    if kind == "shared_kn":
        # the k >= 2 body defaults of prefix_sums_cpu (the recipe of its held-out seeds), the LSM recorded
        overrides.update(num_templates=config.kn_templates, lsm_every=config.kn_lsm_every)
    if kind == "shared":
        # every thought starts from the input, as the demo's measured report (README): the k = 1
        # body's random starts (a prefix-sums default since the held-out seeds 4000-4009) stay off
        overrides.update(num_templates=config.num_templates, recurrence_reg=config.recurrence_reg,
                         random_state=0.0)
    if kind == "ff":
        # He-initialised recall convs, as the measured report: the body's default became the identity
        # start later (docs/algorithmic.md, "A feed-forward control that trains")
        overrides.update(recall_init="he")
    return resolve_config("prefix_sums_cpu", overrides=overrides)


def _train_side_by_side(configs: dict[str, TrainConfig], device: str) -> None:
    """One `softshare train` process per net, in parallel, one thread each on CPU: these small nets
    barely use a second core, so single-threaded runs side by side finish soonest."""
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if device == "cpu" else {})}
    procs = {}
    for kind, train_config in configs.items():
        config_file = Path(train_config.out_dir) / f"{kind}.json"
        write_json(config_file, train_config.to_dict())
        procs[kind] = subprocess.Popen([sys.executable, "-m", "softshare", "train", "--config", str(config_file)],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    readers = [threading.Thread(target=_relay, args=(kind, proc.stdout), daemon=True) for kind, proc in procs.items()]
    for reader in readers:
        reader.start()
    try:
        codes = {kind: proc.wait() for kind, proc in procs.items()}
    except BaseException:
        for proc in procs.values():
            proc.terminate()
        raise
    for reader in readers:
        reader.join()
    failed = [kind for kind, code in codes.items() if code != 0]
    if failed:
        if all(code == 130 for code in codes.values()):
            raise KeyboardInterrupt
        raise SoftshareError(f"training the {' and '.join(failed)} net failed (see the lines above)")


def _relay(kind: str, stream) -> None:
    for line in stream:
        print(f"      [{kind}] {line.rstrip()}", flush=True)


def _plot_training(histories: dict[str, list[dict]], configs: dict[str, TrainConfig], labels: dict[str, str],
                   path: Path) -> None:
    """Training exact match and loss against steps, one line per net."""
    fig = Figure(figsize=(10, 3.8), layout="tight")
    ax_acc, ax_loss = fig.subplots(1, 2)
    for kind, rows in histories.items():
        per_epoch = steps_per_epoch(configs[kind])
        steps = [r["epoch"] * per_epoch for r in rows]
        label = labels[kind].removesuffix(" (folded)")  # folding comes after training
        ax_acc.plot(steps, [100 * r["train_acc"] for r in rows], color=COLOURS[kind], marker=".", label=label)
        ax_loss.plot(steps, [r["train_loss"] for r in rows], color=COLOURS[kind], marker=".", label=label)
    ax_acc.set(xlabel="training steps", ylabel="training exact match (%)", ylim=(-2, 102),
               title="32-bit strings solved during training")
    ax_loss.set(xlabel="training steps", ylabel="training loss", yscale="log", title="training loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


# drawn in this order; where lines coincide (all at 100%) the wide hollow marker rings the small filled one
STYLES = {"shared": dict(marker="s", ms=11, mfc="none", mew=1.6, ls="--", lw=2.2, zorder=2),
          "shared_kn": dict(marker="D", ms=8, mfc="none", mew=1.4, ls=(0, (1, 1)), lw=2.0, zorder=2.2),
          "ff": dict(marker="^", ms=8, mfc="none", mew=1.4, ls="-.", lw=1.6, zorder=2.5),
          "recurrent": dict(marker="o", ms=4.5, ls="-", lw=1.2, zorder=3)}
COLOURS = {"recurrent": "C0", "shared": "C1", "ff": "C2", "shared_kn": "C3"}


def _plot_thinking(curves: dict, evaluations: dict, config: DemoConfig, labels: dict[str, str], path: Path) -> None:
    """Left: exact match at the stopping rule against string length. Right: exact match against
    iterations on the longest strings; the feed-forward net runs only its trained iterations."""
    fig = Figure(figsize=(11, 4.3), layout="constrained")
    ax_size, ax_iter = fig.subplots(1, 2)
    sizes = [int(s) for s in config.test_sizes]
    for kind in STYLES:
        test = evaluations[kind]["test"]
        ax_size.plot(sizes, [100 * test[str(s)]["stable"] for s in sizes], color=COLOURS[kind], label=labels[kind],
                     **STYLES[kind])
    ax_size.set_xscale("log")
    ax_size.set_xticks(sizes, [str(s) for s in sizes])
    ax_size.minorticks_off()
    ax_size.set(xlabel=f"string length (bits; trained at {sizes[0]})", ylabel="exact match at the stopping rule (%)",
                ylim=(-4, 104), title="extrapolation to longer strings")
    largest = str(max(sizes))
    for kind in STYLES:
        curve = curves[kind][largest]
        short = len(curve) <= config.depth
        label = f"{labels[kind]} (only its {len(curve)} trained iterations)" if short else labels[kind]
        ax_iter.plot(range(1, len(curve) + 1), [100 * a for a in curve], color=COLOURS[kind], label=label,
                     ls=STYLES[kind]["ls"], lw=2.5 if short else STYLES[kind]["lw"],
                     zorder=3.5 if short else STYLES[kind]["zorder"])  # a short line on top, where others begin
        stop = evaluations[kind]["test"][largest]
        if not short:
            ax_iter.plot(stop["stable_iteration"], 100 * stop["stable"], "o", ms=7, color=COLOURS[kind],
                         markeredgecolor="black", zorder=4)
    ax_iter.axvline(config.depth, color="grey", ls=":", lw=1.2, label=f"trained iterations ({config.depth})")
    if any(len(curves[kind][largest]) > config.depth for kind in STYLES):
        ax_iter.plot([], [], "o", color="white", markeredgecolor="black", label="where the stopping rule stops (mean)")
    ax_iter.set(xlabel="iterations", ylabel=f"exact match on {largest}-bit strings (%)", ylim=(-4, 104),
                title="thinking longer than trained")
    for ax in (ax_size, ax_iter):
        ax.grid(alpha=0.3)
        handles, drawn = ax.get_legend_handles_labels()
        rank = [next((i for i, kind in enumerate(NETS) if label.startswith(labels[kind])), len(NETS))
                for label in drawn]
        order = sorted(range(len(drawn)), key=rank.__getitem__)  # the nets in NETS order, then the rest
        # right panel: the curves and stop markers fill the plot wherever the nets learned, so its
        # legend goes below the axes, where it can hide nothing
        place = dict(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2) if ax is ax_iter else dict(loc="best")
        ax.legend([handles[i] for i in order], [drawn[i] for i in order], fontsize=8, **place)
    save_figure(fig, path)


def _report(results: dict, lsm_figures: dict[str, list[str]], figures: dict[str, str]) -> str:
    c, ev = results["config"], results["evaluations"]
    labels = net_labels(c)
    sizes = list(ev["recurrent"]["test"])
    heads = " | ".join(labels[k] for k in NETS)
    lines = [
        "# softshare demo report", "",
        f"Prefix sums: {c['train_count']} strings of 32 bits for training; four nets of width {c['width']} and "
        f"{c['depth']} iterations trained with one recipe (`prefix_sums_cpu`: DeepThinking's recall iteration "
        f"with a linear recall and a 2-conv head, progressive loss, Adam). The first soft-shared net mixes each "
        f"conv role from a bank of {c['num_templates']} template{'' if c['num_templates'] == 1 else 's'} "
        f"(recurrence regulariser {c['recurrence_reg']}); the second from {c['kn_templates']}, with the k >= 2 "
        f"recipe (the signed recurrence regulariser, random starts, its last iteration also run past depth with "
        f"its mix fixed): which of its layers become one loop is found in training. One seed ({c['seed']}), "
        f"{c['epochs']} epochs, {results['hardware']}, {results['seconds']:.0f} s in all. Other seeds differ: see "
        f"docs/algorithmic.md.", "",
        f"| | {heads} |", "| --- |" + " ---: |" * len(NETS),
        "| parameters | " + " | ".join(f"{ev[k]['parameters']:,}" for k in NETS) + " |",
        "| runs up to (iterations) | " + " | ".join(str(ev[k]["eval_iterations"]) for k in NETS) + " |", "",
    ]
    for kind in ("shared", "shared_kn"):
        fold = ev[kind]["fold"]
        lines += [f"Folding the {labels[kind].removesuffix(' (folded)')} net at |cos| >= {DEFAULT_THRESHOLD}: loops "
                  f"{fold['loops']}, {ev[kind]['parameters']:,} -> {fold['params_after']:,} parameters, exact match at "
                  f"32 bits {100 * fold['acc_before']:.1f}% -> {100 * fold['acc_after']:.1f}%; "
                  + ("its last loop runs any number of iterations." if fold["runs_longer"] and not fold["repeats_last"]
                     else "no loop formed at its end; its last iteration, trained past depth, repeats."
                     if fold["repeats_last"] else "no loop formed at its end, so it cannot run past its depth."), ""]
    lines += [
        f"Exact match (%) on unseen strings at the stopping rule (a prediction unchanged for {c['patience']} "
        f"iterations; no labels), with the mean iteration it stopped at:", "",
        "| bits | " + heads + " |", "| ---: |" + " ---: |" * len(NETS),
    ]
    for size in sizes:
        cells = " | ".join(f"{100 * ev[k]['test'][size]['stable']:.0f} ({ev[k]['test'][size]['stable_iteration']:.0f})"
                           for k in NETS)
        lines.append(f"| {size} | {cells} |")
    lines += ["", f"![thinking]({figures['thinking']})", "", "## Training", "", f"![training]({figures['training']})",
              "", "## The soft-shared nets' banks (one per conv role)", "",
              f"With one template per bank ({labels['shared'].removesuffix(' (folded)')}) every iteration's weight is "
              "a multiple c_t of it (its Layer Similarity Matrix is all ones), so its figures show the scales c_t:", ""]
    lines += [f"![LSM](runs/shared/{LSM_FIGURES}/{name})" for name in lsm_figures["shared"]]
    lines += ["", f"With {c['kn_templates']} templates the LSM shows which layers became the same layer: blocks of "
              "|cos| near 1 along the diagonal are the loops the fold finds. Over training (the iterations start "
              "apart, from orthogonal coefficient rows):", "",
              f"![LSM over training](runs/shared_kn/{LSM_DIR}/{figure_path(HISTORY_FIGURE, c['figure_format']).name})",
              "", "and at the scored checkpoint:", ""]
    lines += [f"![LSM](runs/shared_kn/{LSM_FIGURES}/{name})" for name in lsm_figures["shared_kn"]]
    lines += ["", "## Go further", "", "```bash",
              "softshare experiment algorithmic --jobs 2        # every body, 5 seeds: the study in docs/algorithmic.md",
              "softshare eval runs/demo/runs/recurrent          # accuracy against iterations up to 600, stopping rules",
              "softshare train --preset fashion_mnist_cpu        # a shared WRN on real images",
              "softshare train --preset cifar10_swrn_28_10_2_cutout --data-root DIR   # the paper's recipe (GPU)",
              "```", ""]
    return "\n".join(lines)
