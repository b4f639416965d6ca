"""`softshare experiment recurrence`: does the recurrence regulariser make nets foldable?

For each task and each LAMBDA, train with ``--recurrence-reg LAMBDA`` (the pull of same-role
layers in consecutive blocks towards collinear coefficients, `similarity.recurrence_penalty`),
then report accuracy, how many shared layers fold into loops at LSM >= 0.99, and the accuracy
of the folded net. Runs go through the ordinary trainer; a rerun reuses finished runs.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load
from .fold import fold_model, foldable_sites, plan_loops
from .io import write_json, write_text
from .similarity import recurrence_penalty
from .train.config import TrainConfig, resolve_config
from .train.loop import train

log = logging.getLogger("softshare.experiment")

FOLD_THRESHOLD = 0.99
LAMBDAS = (0.0, 0.05, 1.0)


@dataclass(frozen=True)
class Setting:
    """One task at CPU scale: a preset and the overrides that size it."""

    preset: str
    overrides: dict = field(default_factory=dict)


SETTINGS = {
    # 2 shared blocks (4 shared convs) per stage bank; ~1 min per epoch on 2 cores
    "fashion_mnist": Setting("fashion_mnist_cpu", {"model": "swrn_22_1_2", "epochs": 2}),
    # 16 blocks (32 convs) drawing from one bank of 4 templates
    "mazes": Setting("mazes_cpu", {"model": "shared", "num_templates": 4, "width": 16, "depth": 16,
                                   "lr": 0.002, "epochs": 15}),
}


def _evaluator(config: TrainConfig, device: torch.device):
    """Accuracy on the run's own evaluation set: Fashion-MNIST test set, or held-out mazes."""
    if config.task == "classification":
        from .evaluate import test_set_evaluator

        evaluate = test_set_evaluator(config.dataset, config.data_root, device=str(device))
        return lambda model: evaluate(model)["acc"]
    from .train.algorithmic import evaluation_examples, exact_match_by_iteration

    x, y = evaluation_examples(config.to_dict(), config.train_size, config.test_count, config.data_root)

    def exact_match(model: nn.Module) -> float:
        return exact_match_by_iteration(model, config.task, x, y, config.depth, 100, device)[-1]

    return exact_match


def folded_layers(model: nn.Module, threshold: float = FOLD_THRESHOLD) -> tuple[int, int]:
    """(shared layers that end up in a loop of length >= 2, all shared layers of foldable sites)."""
    folded = total = 0
    for site, loops in zip(foldable_sites(model), plan_loops(model, threshold)):
        per_block = len(site.roles)
        total += per_block * sum(loops)
        folded += per_block * sum(n for n in loops if n >= 2)
    return folded, total


def run_study(out_dir: str | Path, tasks: tuple[str, ...] = tuple(SETTINGS), lambdas: tuple[float, ...] = LAMBDAS,
              seed: int = 0, device: str = "auto", epochs: int | None = None) -> dict:
    out = Path(out_dir)
    rows = []
    for task in tasks:
        setting = SETTINGS[task]
        for lam in lambdas:
            overrides = {**setting.overrides, "recurrence_reg": lam, "seed": seed, "device": device,
                         "out_dir": str(out / "runs"), "name": f"{task}-reg{lam:g}-s{seed}",
                         **({"epochs": epochs} if epochs else {})}
            config = resolve_config(setting.preset, overrides=overrides)
            run_path = out / "runs" / config.name
            if (run_path / "checkpoints" / "last").exists():
                log.info("%s: reusing the finished run", config.name)
                model = load(run_path / "checkpoints" / "last")
            else:
                log.info("%s: training with recurrence_reg %g", config.name, lam)
                model = train(config).model.eval()
            dev = next(model.parameters()).device
            evaluate = _evaluator(config, dev)
            folded, total = folded_layers(model)
            result = fold_model(model, FOLD_THRESHOLD)
            rows.append({
                "task": task, "model": config.model, "recurrence_reg": lam, "seed": seed, "epochs": config.epochs,
                "accuracy": evaluate(model), "folded_accuracy": evaluate(result.model),
                "layers_folded": folded, "shared_layers": total, "loops": result.loops,
                "foldable_pair_similarity": float(1 - recurrence_penalty(model).detach()),
                "params": result.params_before, "params_folded": result.params_after})
            log.info("%s: accuracy %.4f, %d/%d layers fold at %.2f, folded accuracy %.4f", config.name,
                     rows[-1]["accuracy"], folded, total, FOLD_THRESHOLD, rows[-1]["folded_accuracy"])
    results = {"threshold": FOLD_THRESHOLD, "rows": rows, "torch": torch.__version__,
               "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"}
    write_json(out / "results.json", results)
    write_text(out / "results.md", markdown(results))
    return results


def markdown(results: dict) -> str:
    lines = [f"Recurrence regulariser: accuracy and folding at LSM >= {results['threshold']} "
             f"({results['hardware']}, torch {results['torch']}).", "",
             "| task | model | epochs | reg | accuracy | mean cos^2 of foldable pairs | layers folded | loops | "
             "params -> folded | folded accuracy |", "|---|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['task']} | {r['model']} | {r['epochs']} | {r['recurrence_reg']:g} | {r['accuracy']:.4f} | "
                     f"{r['foldable_pair_similarity']:.3f} | {r['layers_folded']}/{r['shared_layers']} | {r['loops']} | "
                     f"{r['params']:,} -> {r['params_folded']:,} | {r['folded_accuracy']:.4f} |")
    return "\n".join(lines) + "\n"
