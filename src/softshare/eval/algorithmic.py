"""Evaluating nets on mazes and prefix sums: exact match per instance, per iteration, per size.

Accuracy here is all-or-nothing per instance (every path pixel / every bit right), as in the
easy-to-hard benchmark: a maze with one wrong pixel is not solved. The scores come after every
iteration of one pass (`think`), together with where two label-free stopping rules stop, so
accuracy-vs-iterations curves and "how long to think" come from the same pass. `evaluate_task`
is the one way a run is scored (the `eval` command, the studies and the demo): every test size,
a soft-shared net folded so that it can think longer than trained.
"""

from __future__ import annotations

import copy

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint import describe_checkpoint, find_checkpoint, load, load_checkpoint, read_meta
from ..data.tasks import IN_CHANNELS, evaluation_examples, image_side
from ..device import resolve_device
from ..errors import SoftshareError
from ..fold import DEFAULT_THRESHOLD, FoldResult, fold_model
from ..layers import named_banks, to_channels_last
from ..layers.structure import count_parameters
from ..pretrained import is_pretrained, pretrained_name
from ..progress import progress
from ..storage import check_output, exclusive_lock, figure_path, file_digest, output_lock, write_json
from .plots import (animate_maze_thinking, maze_predictions, pick_mazes, plot_accuracy_vs_iterations,
                    plot_maze_predictions)

log = logging.getLogger("softshare.eval")


def solve_mask(task: str, x: Tensor) -> Tensor | None:
    """Pixels that count: a maze's open (white/green/red) pixels; every bit of a prefix sum."""
    return x.amax(dim=1) > 0 if task == "mazes" else None


def solved(task: str, logits: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Bool (N,): each instance solved exactly (every pixel / bit that counts right)."""
    mask = solve_mask(task, x)
    right = logits.argmax(dim=1) == y
    return (right if mask is None else right | ~mask).flatten(1).all(dim=1)


STOP_PATIENCE = 10  # the stable rule: iterations a prediction must stay unchanged before it stops
EXTRAPOLATION_FACTOR = 20  # unbounded nets are scored up to this many times their trained iterations
MAZES_SHOWN = 8  # instances per size kept for the maze figure, to find one the net solves and one it does not
LEARNED = 0.05  # below this exact match at the training size a net is not run longer than trained


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
    solved_count = torch.zeros(iterations, dtype=torch.float64, device=device)  # no host sync per iteration
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
                right = solved(task, logits, yb, xb)
                solved_count[index] += right.sum()
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
    return {"exact_match": (solved_count / count).cpu().tolist(), "patience": patience,
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


def default_iterations(model: nn.Module, trained: int) -> int:
    """ff/shared: their depth; nets that run any number (recurrent, folded): 20x the trained count,
    enough for the 512-bit prefix sums a 32-bit net needs about 0.45 x 512 iterations for."""
    return model.max_iterations or EXTRAPOLATION_FACTOR * trained


def thinking_net(model: nn.Module, threshold: float = DEFAULT_THRESHOLD) -> tuple[nn.Module, FoldResult | None]:
    """The net to run longer than trained, and what folding did for it.

    A soft-shared net (one with template banks) is folded at `threshold`, so a final run of
    collinear iterations becomes a loop that can run any number of times; every other net is
    returned as it is (None). The same in `softshare eval`, the studies and the per-epoch
    validation that picks a run's best checkpoint.
    """
    if not named_banks(model):
        return model, None
    folded = fold_model(model, threshold)
    return folded.model, folded


def repeating_last(net: nn.Module, config: Mapping) -> nn.Module:
    """`net` as a run trained with `run_on` is evaluated: without a final loop, past its depth it
    repeats its last iteration, the step that training ran past depth (a shallow copy is marked,
    so the caller's model keeps its own behaviour). Any other net is returned as it is."""
    if not config.get("run_on") or not hasattr(net, "repeats_last") or net.max_iterations is None:
        return net
    marked = copy.copy(net)
    marked.repeats_last = True
    return marked


@dataclass
class TaskEvaluation:
    """An algorithmic net scored on its task (`evaluate_task`): `model` as loaded, `evaluated`
    the net actually run (folded, for a shared net), and the numbers in `result`:

    ``parameters``, ``trained_iterations``, ``eval_iterations``, ``patience``, ``fold`` (None, or
    what folded: ``threshold``, ``loops``, ``params_after``, exact match at the training size
    after the trained iterations ``acc_before``/``acc_after``, ``runs_longer``), and per test
    size ``accuracy`` (exact match after each iteration), ``stop`` (where the label-free rules
    stop, see `think`) and ``test`` (``at_trained``, ``last``, ``best``, ``best_iteration``,
    ``stable``, ``stable_iteration``, ``confident``, ``confident_iteration``).
    """

    model: nn.Module
    evaluated: nn.Module
    result: dict
    examples: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # the first MAZES_SHOWN per size


def evaluate_task(model: nn.Module, config: Mapping, *, sizes: Sequence[int] | None = None,
                  count: int | None = None, iterations: int | None = None, patience: int = STOP_PATIENCE,
                  fold: bool = True, threshold: float = DEFAULT_THRESHOLD, batch_size: int = 100,
                  device: torch.device | str = "cpu", data_root: str | None = None,
                  log: logging.Logger = log) -> TaskEvaluation:
    """Score an algorithmic net of a run with resolved training `config` on its test sets: every
    size (default: the run's test sizes), every iteration, the stopping rules.

    With `fold`, a soft-shared net is folded first (`thinking_net`) so that it can think longer.
    Nets that run any number of iterations run `default_iterations`, unless they learned nothing:
    below LEARNED at the training size both after their trained iterations and at the stable rule
    with that budget. Such a net is scored at its trained count (saving the long sizes' time).
    Either score alone would mislead: a slow thinker is below LEARNED after its trained
    iterations but solves the training size by thinking longer (the per-epoch validation may pick
    it as best), and an overthinker solves it after its trained iterations but loses it when run
    longer (its stable rule must be scored with the budget, not cut to the trained count).
    `iterations` overrides both.
    """
    check_positive("patience", patience)
    if iterations is not None:
        check_positive("iterations", iterations)
    device = resolve_device(device) if isinstance(device, str) else device
    task, trained = config["task"], config["depth"]
    count = count or config["test_count"]
    root = data_root or config.get("data_root")
    sizes = list(sizes or config["test_sizes"] or [config["train_size"]])

    def exact_match_at_training_size(net: nn.Module) -> float:
        x, y = evaluation_examples(config, config["train_size"], count, root)
        return think(net, task, x, y, trained, batch_size, device)["exact_match"][-1]

    def stable_at_training_size(net: nn.Module, budget: int) -> float:
        x, y = evaluation_examples(config, config["train_size"], count, root)
        thought = think(net, task, x, y, budget, batch_size, device, patience=patience, until_settled=True)
        return thought["stop"]["stable"]["exact_match"]

    evaluated, folded = thinking_net(model, threshold) if fold else (model, None)
    evaluated = repeating_last(evaluated, config)
    result: dict = {"parameters": count_parameters(model), "trained_iterations": trained, "patience": patience,
                    "fold": None}
    after = None
    if folded is not None:
        before, after = exact_match_at_training_size(model), exact_match_at_training_size(evaluated)
        result["fold"] = {"threshold": threshold, "loops": folded.loops[0], "params_after": folded.params_after,
                          "acc_before": before, "acc_after": after,
                          "runs_longer": evaluated.max_iterations is None,
                          "repeats_last": bool(getattr(evaluated, "repeats_last", False))}
        log.info("folded at |cos| >= %g into loops %s (%d -> %d parameters): exact match at size %d %.1f%% -> "
                 "%.1f%%%s", threshold, folded.loops[0], folded.params_before, folded.params_after,
                 config["train_size"], 100 * before, 100 * after,
                 "; its last iteration, trained past depth (run_on), repeats" if result["fold"]["repeats_last"] else
                 "; its last loop runs any number of iterations" if evaluated.max_iterations is None else "")
    evaluated = in_trained_layout(evaluated, config)
    if iterations is None:
        iterations = default_iterations(evaluated, trained)
        if iterations > trained:
            at_trained = after if after is not None else exact_match_at_training_size(evaluated)
            if at_trained < LEARNED and stable_at_training_size(evaluated, iterations) < LEARNED:
                log.info("below %.0f%% exact match at the training size after %d iterations and at the stable rule "
                         "thinking up to %d: scored at its %d trained iterations only", 100 * LEARNED, trained,
                         iterations, trained)
                iterations = trained
    evaluated.check_iterations(0, iterations)
    result["eval_iterations"] = iterations
    result.update(accuracy={}, stop={}, test={})
    examples: dict[int, tuple[Tensor, Tensor]] = {}
    cost = [image_side(s) ** 2 if task == "mazes" else s for s in sizes]  # per instance and iteration
    for size in progress(sizes, "scoring", unit="size", log=log, weights=cost, every_s=0.0):
        log.info("size %d: %d instances, %d iterations", size, count, iterations)
        x, y = evaluation_examples(config, size, count, root)
        thought = think(evaluated, task, x, y, iterations, batch_size, device, patience=patience)
        curve, stop = thought["exact_match"], thought["stop"]
        best = max(range(len(curve)), key=curve.__getitem__)
        result["accuracy"][str(size)], result["stop"][str(size)] = curve, stop
        examples[size] = (x[:MAZES_SHOWN], y[:MAZES_SHOWN])
        result["test"][str(size)] = {
            "at_trained": curve[min(trained, iterations) - 1], "last": curve[-1], "best": curve[best],
            "best_iteration": best + 1,
            "stable": stop["stable"]["exact_match"], "stable_iteration": stop["stable"]["mean_iteration"],
            "confident": stop["confident"]["exact_match"],
            "confident_iteration": stop["confident"]["mean_iteration"]}
    return TaskEvaluation(model, evaluated, result, examples)


def score_task_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "auto",
                          **options) -> TaskEvaluation:
    """`evaluate_task` on a checkpoint of an algorithmic run (see `find_checkpoint` for the paths
    accepted: a run directory is scored from its best checkpoint), its weights read once; the
    result also names the checkpoint, its epoch, model, task and test set. Writes nothing."""
    checkpoint = load_checkpoint(path, train_state=False)
    config = checkpoint.meta.get("config") or {}
    if config.get("task") not in IN_CHANNELS:
        raise SoftshareError(f"{checkpoint.path} was not trained on an algorithmic task "
                             f"(task {config.get('task')!r})")
    dev = resolve_device(device) if isinstance(device, str) else device
    evaluation = evaluate_task(load(checkpoint, device=dev), config, device=dev, **options)
    evaluation.result = {"checkpoint": str(checkpoint.path), "checkpoint_epoch": checkpoint.meta.get("epoch"),
                         "task": config["task"], "model": checkpoint.meta["model"]["name"],
                         "train_size": config["train_size"], "seed": config["seed"],
                         "count": options.get("count") or config["test_count"], **evaluation.result}
    return evaluation


def evaluate_task_checkpoint(path: str | os.PathLike, sizes: list[int] | None = None, iterations: int | None = None,
                             count: int | None = None, device: str = "auto", batch_size: int = 100,
                             data_root: str | None = None, out: str | None = None,
                             patience: int = STOP_PATIENCE, overwrite: bool = False, fold: bool = True,
                             threshold: float = DEFAULT_THRESHOLD, figure_format: str = "png") -> dict:
    """`score_task_checkpoint`, written as JSON and a plot (for mazes also input/target/prediction
    figures, a solved and an unsolved maze per size, and a GIF), the figures in `figure_format`:
    what `softshare eval` does with an algorithmic run.

    Defaults come from the run's config: its test sizes, test count and seed (the test sets are
    disjoint from its training and validation rows). Outputs go to `out` (a .json path; the
    plots beside it) or next to the checkpoint (`<run>/eval-<best|last>.json`, under the run's
    lock: not while it trains; a shipped ``pretrained:NAME`` net: `eval-NAME.json` in the working
    directory). Each of them must be new or this job's own (the JSON says so, and records the
    plots it wrote with their digests), unless `overwrite`; one evaluation at a time writes an
    `out`.
    """
    check_positive("patience", patience)
    if iterations is not None:
        check_positive("iterations", iterations)
    figure_path("plot", figure_format)  # a bad format is refused before any work
    if out is None and is_pretrained(path):  # never write into the installed package
        out = f"eval-{pretrained_name(str(path))}.json"
    if out and Path(out).suffix != ".json":
        raise SoftshareError(f"--out {out} must be a .json path (the plots go beside it); give e.g. "
                             f"--out {Path(out).with_suffix('.json')}")
    ckpt_path = find_checkpoint(path)
    meta = read_meta(ckpt_path)
    config = meta.get("config") or {}
    if config.get("task") not in IN_CHANNELS:
        raise SoftshareError(f"{ckpt_path} was not trained on an algorithmic task (task {config.get('task')!r})")
    json_path = Path(out) if out else _default_eval_path(ckpt_path)
    companions = _companions(json_path, config["task"], figure_format)
    if out:  # before any work: never clobber a user's file, the JSON or a plot beside it
        check_output(json_path, "eval", overwrite=overwrite, directory=False)
        for companion in companions.values():
            if companion.is_dir() and not companion.is_symlink():
                raise SoftshareError(f"refusing to write the eval plot {companion}: it is a directory; choose "
                                     f"another --out")
            if not overwrite and os.path.lexists(companion) and not _own_companion(json_path, companion):
                raise SoftshareError(f"refusing to write the eval plot {companion}: it exists and is not one this job "
                                     f"wrote for {json_path.name}; choose another --out, or pass --overwrite to "
                                     f"replace it")
            check_output(companion, "eval plot", overwrite=True, directory=False)  # a link: refused
    run = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else None
    lock = (output_lock(json_path, "eval output") if out or run is None else
            exclusive_lock(run, "run", "wait for its training to end, or pass --out PATH outside the run"))
    with lock:
        evaluation = score_task_checkpoint(ckpt_path, device=device, sizes=sizes, count=count, iterations=iterations,
                                           patience=patience, fold=fold, threshold=threshold, batch_size=batch_size,
                                           data_root=data_root)
        found = evaluation.result
        result = {"softshare_output": "eval", **found, "chosen": describe_checkpoint(ckpt_path, meta),
                  "epoch": meta.get("epoch"), "iterations": list(range(1, found["eval_iterations"] + 1))}
        # the JSON claims its plots first (digest pending), so a kill while drawing leaves them provably ours
        write_json(json_path, {**result, "files": {p.name: None for p in companions.values()}})
        plot_accuracy_vs_iterations(result, companions["plot"])
        if found["task"] == "mazes":
            examples = evaluation.examples
            device_used = next(evaluation.evaluated.parameters()).device
            predictions = maze_predictions(evaluation.evaluated, examples, found["eval_iterations"], device_used)
            at = min(found["trained_iterations"], found["eval_iterations"])
            rows = pick_mazes(examples, predictions, at)
            plot_maze_predictions(rows, at, companions["mazes_plot"])
            animate_maze_thinking(rows, companions["mazes_animation"])
        write_json(json_path, {**result, "files": {p.name: file_digest(p) for p in companions.values()}})
    return {**result, "json": str(json_path), **{k: str(v) for k, v in companions.items()}}


def _companions(json_path: Path, task: str, figure_format: str) -> dict[str, Path]:
    """The plots an eval writes beside its JSON."""
    plots = {"plot": _plot_path(json_path, figure_format)}
    if task == "mazes":
        plots.update(mazes_plot=_mazes_plot_path(json_path, figure_format),
                     mazes_animation=_mazes_animation_path(json_path))
    return plots


def _own_companion(json_path: Path, companion: Path) -> bool:
    """Whether `companion` is a plot an earlier eval wrote beside `json_path` (by that JSON's record
    of it and its digest; a pending digest: a writer killed while drawing)."""
    try:
        record = json.loads(json_path.read_text())
        files = record.get("files") if record.get("softshare_output") == "eval" else None
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(files, dict) or companion.name not in files:
        return False
    digest = files[companion.name]
    return digest is None or (companion.is_file() and file_digest(companion) == digest)


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
