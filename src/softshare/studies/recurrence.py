"""`softshare experiment recurrence`: does the recurrence regulariser make nets foldable?

For each task, LAMBDA and seed, train with ``--recurrence-reg LAMBDA`` (the pull of same-role
layers in consecutive blocks towards collinear coefficients, `analysis.recurrence_penalty`),
then report accuracy, how many shared layers fold into loops at LSM >= the fold threshold, and
the accuracy of the folded net. Runs go through the ordinary trainer; a rerun reuses finished runs
and continues interrupted ones (`--resume auto`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..analysis import recurrence_penalty
from ..device import environment_description
from ..errors import SoftshareError
from ..eval.run import evaluator_for
from ..fold import DEFAULT_THRESHOLD, fold_model, foldable_sites, plan_loops
from ..storage import write_json, write_text
from ..train.config import TrainConfig, resolve_config
from ..train.loop import train

log = logging.getLogger("softshare.experiment")

LAMBDAS = (0.0, 0.05, 1.0)


@dataclass(frozen=True)
class Setting:
    """One task at CPU scale: a preset and the overrides that size it."""

    preset: str
    overrides: dict = field(default_factory=dict)


SETTINGS = {
    # 2 shared blocks (4 shared convs) per stage bank; an epoch's time: docs/fashion_mnist.md
    "fashion_mnist": Setting("fashion_mnist_cpu", {"model": "swrn_22_1_2", "epochs": 2}),
    # 16 iterations of 5 convs (recall, conv1..conv4), one bank of 4 templates per conv role: 5 banks of 16 layers
    "mazes": Setting("mazes_cpu", {"model": "shared", "num_templates": 4, "width": 16, "depth": 16,
                                   "lr": 0.002, "epochs": 15}),
}


def folded_layers(model: nn.Module, threshold: float = DEFAULT_THRESHOLD) -> tuple[int, int]:
    """(shared layers that end up in a loop of length >= 2, all shared layers of foldable sites)."""
    folded = total = 0
    for site, loops in zip(foldable_sites(model), plan_loops(model, threshold)):
        per_block = len(site.roles)
        total += per_block * sum(loops)
        folded += per_block * sum(n for n in loops if n >= 2)
    return folded, total


def run_study(out_dir: str | Path, tasks: tuple[str, ...] = tuple(SETTINGS), lambdas: tuple[float, ...] = LAMBDAS,
              seeds: tuple[int, ...] = (0,), device: str = "auto", epochs: int | None = None,
              figure_format: str = "png") -> dict:
    """Train (or reuse) one run per (task, lambda, seed); write results.json and results.md (the
    runs' own figures in `figure_format`)."""
    check_study(out_dir, tasks, lambdas, seeds, device, epochs, figure_format)
    out = Path(out_dir)
    rows = []
    for task in tasks:
        setting = SETTINGS[task]
        for lam in lambdas:
            for seed in seeds:
                rows.append(_run_one(out, task, setting, lam, seed, device, epochs, figure_format))
    results = {"threshold": DEFAULT_THRESHOLD, "rows": rows, "torch": torch.__version__,
               "hardware": environment_description(device)}
    write_json(out / "results.json", results)
    write_text(out / "results.md", markdown(results))
    return results


def check_study(out_dir: str | Path, tasks: tuple[str, ...], lambdas: tuple[float, ...], seeds: tuple[int, ...],
                device: str = "auto", epochs: int | None = None, figure_format: str = "png") -> None:
    """Refuse bad arguments, and every run's config that would not validate, before anything is written."""
    for task in tasks:
        if task not in SETTINGS:
            raise SoftshareError(f"unknown task {task!r} for the recurrence study; use some of {', '.join(SETTINGS)}")
    if not lambdas or not all(math.isfinite(lam) and lam >= 0 for lam in lambdas):
        raise SoftshareError(f"recurrence_reg values must be finite and non-negative, got {list(lambdas)}")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SoftshareError(f"seeds must be distinct non-negative integers, got {list(seeds)}")
    for task in tasks:
        for lam in lambdas:
            for seed in seeds:
                _config(Path(out_dir), task, SETTINGS[task], lam, seed, device, epochs, figure_format)


def _config(out: Path, task: str, setting: Setting, lam: float, seed: int, device: str,
            epochs: int | None, figure_format: str = "png") -> TrainConfig:
    overrides = {**setting.overrides, "recurrence_reg": lam, "seed": seed, "device": device,
                 "figure_format": figure_format,
                 "out_dir": str(out / "runs"), "name": f"{task}-reg{lam:g}-s{seed}",
                 **({"epochs": epochs} if epochs else {})}
    return resolve_config(setting.preset, overrides=overrides)


def _run_one(out: Path, task: str, setting: Setting, lam: float, seed: int, device: str,
             epochs: int | None, figure_format: str = "png") -> dict:
    config = _config(out, task, setting, lam, seed, device, epochs, figure_format)
    log.info("%s: training with recurrence_reg %g (a finished run is reused, an interrupted one continued)",
             config.name, lam)
    trained = train(config, resume="auto")
    if trained.interrupted:
        raise KeyboardInterrupt
    model = trained.model.eval()
    dev = next(model.parameters()).device
    evaluate = evaluator_for(config.to_dict(), str(dev))
    folded, total = folded_layers(model)
    result = fold_model(model, DEFAULT_THRESHOLD)
    row = {"task": task, "model": config.model, "recurrence_reg": lam, "seed": seed, "epochs": config.epochs,
           "accuracy": evaluate(model)["acc"], "folded_accuracy": evaluate(result.model)["acc"],
           "layers_folded": folded, "shared_layers": total, "loops": result.loops,
           "foldable_pair_similarity": float(1 - recurrence_penalty(model).detach()),
           "params": result.params_before, "params_folded": result.params_after}
    log.info("%s: accuracy %.4f, %d/%d layers fold at %.2f, folded accuracy %.4f", config.name,
             row["accuracy"], folded, total, DEFAULT_THRESHOLD, row["folded_accuracy"])
    return row


def markdown(results: dict) -> str:
    lines = [f"Recurrence regulariser: accuracy and folding at LSM >= {results['threshold']} "
             f"({results['hardware']}).", "",
             "| task | model | seed | epochs | reg | accuracy | mean cos^2 of foldable pairs | layers folded | loops | "
             "params -> folded | folded accuracy |", "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['task']} | {r['model']} | {r['seed']} | {r['epochs']} | {r['recurrence_reg']:g} | "
                     f"{r['accuracy']:.4f} | {r['foldable_pair_similarity']:.3f} | "
                     f"{r['layers_folded']}/{r['shared_layers']} | {r['loops']} | "
                     f"{r['params']:,} -> {r['params_folded']:,} | {r['folded_accuracy']:.4f} |")
    return "\n".join(lines) + "\n"
