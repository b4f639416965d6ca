"""Evaluating nets on mazes and prefix sums: exact match per instance, per iteration, per size.

Accuracy here is all-or-nothing per instance (every path pixel / every bit right), as in the
easy-to-hard benchmark: a maze with one wrong pixel is not solved. The scores come after every
iteration of one pass (`think`), together with where two label-free stopping rules stop, so
accuracy-vs-iterations curves and "how long to think" come from the same pass; a folded net can
also think longer by running its longest loop more times (`exact_match_thinking_longer`).
"""

from __future__ import annotations

import logging

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import find_checkpoint, load, load_checkpoint
from ..data.tasks import IN_CHANNELS, evaluation_examples
from ..device import resolve_device
from ..errors import SoftshareError
from ..fold import DEFAULT_THRESHOLD, fold_model
from ..io import check_output, figure_path, write_json
from ..layers import LoopBlock, loop_blocks, set_iterations, to_channels_last
from ..progress import progress
from .plots import (animate_maze_thinking, maze_predictions, pick_mazes, plot_accuracy_vs_iterations,
                    plot_maze_predictions)

log = logging.getLogger("softshare.eval")


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


STOP_PATIENCE = 10  # the stable rule: iterations a prediction must stay unchanged before it stops
STOP_RULES = ("stable", "confident")
MAZES_SHOWN = 8  # mazes per size scored for the figure, to find one the net solves and one it does not
EXTRAPOLATION_FACTOR = 20  # unbounded nets are scored up to this many times their trained iterations


@torch.no_grad()
def think(model: nn.Module, task: str, x: Tensor, y: Tensor, iterations: int, batch_size: int,
          device: torch.device, amp_dtype: torch.dtype | None = None, patience: int = STOP_PATIENCE,
          until_settled: bool = False) -> dict:
    """Exact match after each of 1..`iterations` iterations, and where two label-free rules stop.

    - ``stable``: each instance stops at the first iteration whose prediction equals those of the
      `patience` iterations before it (its thought has settled); one that never settles stops at
      `iterations`;
    - ``confident``: each instance takes its iteration of highest mean confidence (the max softmax
      over the pixels that count), DeepThinking's ``max_conf`` test mode.

    Neither rule looks at labels: they only score the prediction each rule picked. States are
    scored as they come, so memory does not grow with `iterations`. `until_settled` ends a batch
    once every instance has settled (the stable rule's result is then exact; the per-iteration
    curve counts a stopped batch's instances as unsolved and the confident rule sees only the
    iterations run): a cheap per-epoch validation. Returns ``{"exact_match":
    [per iteration], "stop": {rule: {"exact_match", "mean_iteration"}}, "patience"}``.
    """
    check_positive("patience", patience)
    was_training = model.training
    model.eval()
    solved = torch.zeros(iterations, dtype=torch.float64, device=device)  # no host sync per iteration
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # stable right/at, confident right/at
    for begin in range(0, len(x), batch_size):
        xb, yb = x[begin:begin + batch_size].to(device), y[begin:begin + batch_size].to(device)
        mask = solve_mask(task, xb)
        n = len(yb)
        previous, unchanged = None, torch.zeros(n, dtype=torch.long, device=device)
        stop_at = torch.full((n,), iterations, dtype=torch.long, device=device)
        stop_right = torch.zeros(n, dtype=torch.bool, device=device)
        best_confidence = torch.full((n,), -1.0, device=device)
        best_at = torch.zeros(n, dtype=torch.long, device=device)
        best_right = torch.zeros(n, dtype=torch.bool, device=device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            for index, state in enumerate(model.iterate(xb, iterations)):
                logits = model.head(state).float()
                prediction = logits.argmax(dim=1)
                right = score(task, logits, yb, xb)[1]
                solved[index] += right.sum()
                if previous is not None:
                    same = (prediction == previous).flatten(1).all(dim=1)
                    unchanged = torch.where(same, unchanged + 1, torch.zeros_like(unchanged))
                settles = (unchanged >= patience) & (stop_at == iterations)
                stop_at = torch.where(settles, index + 1, stop_at)
                stop_right = torch.where(settles, right, stop_right)
                confidence = logits.softmax(dim=1).amax(dim=1).flatten(1)
                confidence = (confidence.mean(1) if mask is None else
                              (confidence * mask.flatten(1)).sum(1) / mask.flatten(1).sum(1).clamp_min(1))
                better = confidence > best_confidence
                best_confidence = torch.where(better, confidence, best_confidence)
                best_at = torch.where(better, index + 1, best_at)
                best_right = torch.where(better, right, best_right)
                previous = prediction
                if until_settled and bool((stop_at < iterations).all()):
                    break
        stop_right = torch.where(unchanged >= patience, stop_right, right)  # never settled: the last prediction
        totals += torch.stack([stop_right.sum(), stop_at.sum(), best_right.sum(), best_at.sum()]).double()
    model.train(was_training)
    count = max(len(x), 1)
    stable_right, stable_at, confident_right, confident_at = (totals / count).tolist()
    return {"exact_match": (solved / count).cpu().tolist(), "patience": patience,
            "stop": {"stable": {"exact_match": stable_right, "mean_iteration": stable_at},
                     "confident": {"exact_match": confident_right, "mean_iteration": confident_at}}}


def exact_match_by_iteration(model: nn.Module, task: str, x: Tensor, y: Tensor, iterations: int,
                             batch_size: int, device: torch.device,
                             amp_dtype: torch.dtype | None = None) -> list[float]:
    """Fraction of instances solved after each of 1..`iterations` iterations (see `think`)."""
    return think(model, task, x, y, iterations, batch_size, device, amp_dtype)["exact_match"]


def check_positive(name: str, value: object) -> int:
    """`value` if it is a positive integer, else one clear error naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SoftshareError(f"{name} must be a positive integer, got {value!r}")
    return value


def thinking_net(model: nn.Module, threshold: float = DEFAULT_THRESHOLD) -> tuple[nn.Module, list[int] | None]:
    """The net to run longer than trained, and the loops folded for it.

    A soft-shared algorithmic net (one with template banks) is folded at `threshold`, so a final
    run of collinear iterations becomes a loop that can run any number of times; every other net
    is returned as it is (loops None). The same in `softshare eval`, the studies and the
    per-epoch validation that picks a run's best checkpoint.
    """
    if getattr(model, "banks", None) is None:
        return model, None
    folded = fold_model(model, threshold)
    return folded.model, folded.loops[0]


def default_iterations(model: nn.Module, trained: int) -> int:
    """ff/shared: their depth; nets that run any number (recurrent, folded): 20x the trained count,
    enough for the 512-bit prefix sums a 32-bit net needs about 0.45 x 512 iterations for."""
    return model.max_iterations or EXTRAPOLATION_FACTOR * trained


def evaluate_task_checkpoint(path: str, sizes: list[int] | None = None, iterations: int | None = None,
                             count: int | None = None, device: str = "auto", batch_size: int = 100,
                             data_root: str | None = None, out: str | None = None,
                             patience: int = STOP_PATIENCE, overwrite: bool = False,
                             figure_format: str = "png") -> dict:
    """Exact match per test size after each of 1..`iterations` iterations and at the stopping
    rules (`think`); writes JSON and a plot (for mazes also input/target/prediction figures and a
    GIF), the figures in `figure_format`.

    Defaults come from the run's config: its test sizes, test count and seed (the test sets are
    disjoint from its training and validation rows). Outputs go to `out` (a .json path; the
    plots beside it) or next to the checkpoint (`<run>/eval-<best|last>.json`). An `out`
    holding anything but an earlier eval result is refused unless `overwrite`.
    """
    check_positive("patience", patience)
    if iterations is not None:
        check_positive("iterations", iterations)
    figure_path("plot", figure_format)  # a bad format is refused before any work
    if out:  # before any work: never clobber a user's file (or the plot beside a new result)
        check_output(out, "eval", overwrite=overwrite, directory=False)
        if not Path(out).exists():
            check_output(_plot_path(Path(out), figure_format), "eval plot", overwrite=overwrite, directory=False)
    ckpt_path = find_checkpoint(path)
    meta = load_checkpoint(ckpt_path, train_state=False).meta
    config = meta.get("config") or {}
    if config.get("task") not in IN_CHANNELS:
        raise SoftshareError(f"{ckpt_path} was not trained on an algorithmic task (task {config.get('task')!r})")
    if out and config["task"] == "mazes" and not Path(out).exists():  # the maze figure beside a new result
        for extra in (_mazes_plot_path(Path(out), figure_format), _mazes_animation_path(Path(out))):
            check_output(extra, "eval plot", overwrite=overwrite, directory=False)
    dev = resolve_device(device)
    model = in_trained_layout(load(ckpt_path, device=dev), config)
    trained = config["depth"]
    iterations = iterations or default_iterations(model, trained)
    model.check_iterations(0, iterations)
    sizes = sizes or config["test_sizes"] or [config["train_size"]]
    count = count or config["test_count"]
    accuracy, stop, examples = {}, {}, {}
    for size in progress(sizes, f"scoring {count} instances per size, {iterations} iterations", unit="size",
                         log=log):
        x, y = evaluation_examples(config, size, count, data_root or config["data_root"])
        thought = think(model, config["task"], x, y, iterations, batch_size, dev, patience=patience)
        accuracy[str(size)], stop[str(size)] = thought["exact_match"], thought["stop"]
        examples[size] = (x[:MAZES_SHOWN], y[:MAZES_SHOWN])  # the figure shows one solved, one not
    result = {"softshare_output": "eval", "checkpoint": str(ckpt_path), "task": config["task"],
              "model": meta["model"]["name"],
              "train_size": config["train_size"], "trained_iterations": trained, "seed": config["seed"],
              "count": count, "iterations": list(range(1, iterations + 1)), "patience": patience,
              "accuracy": accuracy, "stop": stop}
    json_path = Path(out) if out else _default_eval_path(ckpt_path)
    write_json(json_path, result)
    plots = {"plot": _plot_path(json_path, figure_format)}
    plot_accuracy_vs_iterations(result, plots["plot"])
    if config["task"] == "mazes":
        at = min(trained, iterations)
        rows = pick_mazes(examples, maze_predictions(model, examples, iterations, dev), at)
        plots["mazes_plot"] = _mazes_plot_path(json_path, figure_format)
        plot_maze_predictions(rows, at, plots["mazes_plot"])
        plots["mazes_animation"] = animate_maze_thinking(rows, _mazes_animation_path(json_path))
    return {**result, "json": str(json_path), **{k: str(v) for k, v in plots.items()}}


def in_trained_layout(model: nn.Module, config: dict) -> nn.Module:
    """The memory layout the run trained in (channels-last 1-D convs: ~1.4x the GFLOP/s on CPU):
    a checkpoint holds weights, not layout, and an evaluation runs 20x the trained iterations."""
    return to_channels_last(model) if config.get("channels_last") else model


def _plot_path(json_path: Path, figure_format: str) -> Path:
    return figure_path(json_path.with_suffix(""), figure_format)


def _mazes_plot_path(json_path: Path, figure_format: str) -> Path:
    return figure_path(json_path.with_name(json_path.stem + "-mazes"), figure_format)


def _mazes_animation_path(json_path: Path) -> Path:
    return json_path.with_name(json_path.stem + "-mazes.gif")


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
