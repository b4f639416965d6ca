"""Evaluating nets on mazes and prefix sums: exact match per instance, per iteration, per size.

Accuracy here is all-or-nothing per instance (every path pixel / every bit right), as in the
easy-to-hard benchmark: a maze with one wrong pixel is not solved. The scores come after every
iteration of one pass (`exact_match_by_iteration`), so accuracy-vs-iterations curves, and rules
that pick an iteration count, build on it; a folded net can also think longer by running its
longest loop more times (`exact_match_thinking_longer`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import find_checkpoint, load, load_checkpoint
from ..data.tasks import IN_CHANNELS, evaluation_examples
from ..device import resolve_device
from ..errors import SoftshareError
from ..io import check_output, write_json
from ..layers import LoopBlock, loop_blocks, set_iterations
from .plots import plot_accuracy_vs_iterations


def solve_mask(task: str, x: Tensor) -> Tensor | None:
    """Pixels that count: a maze's open (white/green/red) pixels; every bit of a prefix sum."""
    return x.amax(dim=1) > 0 if task == "mazes" else None


def score(task: str, logits: Tensor, y: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(mean cross-entropy over the pixels that count, bool (N,) instance solved exactly)."""
    mask = solve_mask(task, x)
    loss = F.cross_entropy(logits.float(), y, reduction="none")
    right = logits.argmax(dim=1) == y
    if mask is None:
        return loss.mean(), right.flatten(1).all(dim=1)
    return (loss * mask).sum() / mask.sum().clamp_min(1), (right | ~mask).flatten(1).all(dim=1)


@torch.no_grad()
def exact_match_by_iteration(model: nn.Module, task: str, x: Tensor, y: Tensor, iterations: int,
                             batch_size: int, device: torch.device,
                             amp_dtype: torch.dtype | None = None) -> list[float]:
    """Fraction of instances solved after each of 1..`iterations` iterations, in one pass per batch.

    States are scored as they come, so memory does not grow with `iterations`.
    """
    was_training = model.training
    model.eval()
    solved = torch.zeros(iterations, dtype=torch.float64, device=device)  # no host sync per iteration
    for begin in range(0, len(x), batch_size):
        xb, yb = x[begin:begin + batch_size].to(device), y[begin:begin + batch_size].to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            for index, state in enumerate(model.iterate(xb, iterations)):
                solved[index] += score(task, model.head(state), yb, xb)[1].sum()
    model.train(was_training)
    return (solved / max(len(x), 1)).cpu().tolist()


def default_iterations(model: nn.Module, trained: int) -> int:
    """ff/shared: their depth; recurrent: 4x the trained count, to see it extrapolate."""
    return model.max_iterations or 4 * trained


def evaluate_task_checkpoint(path: str, sizes: list[int] | None = None, iterations: int | None = None,
                             count: int | None = None, device: str = "auto", batch_size: int = 100,
                             data_root: str | None = None, out: str | None = None, overwrite: bool = False) -> dict:
    """Exact match per test size after each of 1..`iterations` iterations; writes JSON and a plot.

    Defaults come from the run's config: its test sizes, test count and seed (the test sets are
    disjoint from its training and validation rows). Outputs go to `out` (a .json path; the
    plot beside it as .png) or next to the checkpoint (`<run>/eval-<best|last>.json`). An `out`
    holding anything but an earlier eval result is refused unless `overwrite`.
    """
    if out:  # before any work: never clobber a user's file (or the plot beside a new result)
        check_output(out, "eval", overwrite=overwrite, directory=False)
        if not Path(out).exists():
            check_output(Path(out).with_suffix(".png"), "eval plot", overwrite=overwrite, directory=False)
    ckpt_path = find_checkpoint(path)
    meta = load_checkpoint(ckpt_path, train_state=False).meta
    config = meta.get("config") or {}
    if config.get("task") not in IN_CHANNELS:
        raise SoftshareError(f"{ckpt_path} was not trained on an algorithmic task (task {config.get('task')!r})")
    dev = resolve_device(device)
    model = load(ckpt_path, device=dev)
    trained = config["depth"]
    iterations = iterations or default_iterations(model, trained)
    model.check_iterations(0, iterations)
    sizes = sizes or config["test_sizes"] or [config["train_size"]]
    count = count or config["test_count"]
    accuracy = {}
    for size in sizes:
        x, y = evaluation_examples(config, size, count, data_root or config["data_root"])
        accuracy[str(size)] = exact_match_by_iteration(model, config["task"], x, y, iterations, batch_size, dev)
    result = {"softshare_output": "eval", "checkpoint": str(ckpt_path), "task": config["task"], "model": meta["model"]["name"],
              "train_size": config["train_size"], "trained_iterations": trained, "seed": config["seed"],
              "count": count, "iterations": list(range(1, iterations + 1)), "accuracy": accuracy}
    json_path = Path(out) if out else _default_eval_path(ckpt_path)
    write_json(json_path, result)
    plot_accuracy_vs_iterations(result, json_path.with_suffix(".png"))
    return {**result, "json": str(json_path), "plot": str(json_path.with_suffix(".png"))}


def _default_eval_path(ckpt_path: Path) -> Path:
    if ckpt_path.parent.name == "checkpoints":  # <run>/checkpoints/<which>
        return ckpt_path.parent.parent / f"eval-{ckpt_path.name}.json"
    return ckpt_path.parent / f"{ckpt_path.name}-eval.json"


def longest_loop(model: nn.Module) -> tuple[str, LoopBlock] | None:
    """The folded loop of most trained iterations (ties: the last, nearest the head), if any
    loop has 2 or more; None for a net with nothing to run longer."""
    loops = [(name, loop) for name, loop in loop_blocks(model) if loop.length >= 2]
    if not loops:
        return None
    return max(reversed(loops), key=lambda item: item[1].length)


def exact_match_thinking_longer(model: nn.Module, task: str, x: Tensor, y: Tensor, extra: int, batch_size: int,
                                device: torch.device) -> list[float] | None:
    """Exact match after each iteration of a folded net whose longest loop runs `extra` more times
    (the other loops as trained); None when it has no loop of 2 or more blocks."""
    found = longest_loop(model)
    if found is None:
        return None
    name, loop = found
    set_iterations(model, {name: loop.length + extra})
    try:
        return exact_match_by_iteration(model, task, x, y, model.max_iterations, batch_size, device)
    finally:
        set_iterations(model, None)
