"""Evaluating a trained run, whatever it was trained on: the one place that turns a run's config
into an evaluator (`evaluator_for`) or a scored checkpoint (`evaluate_checkpoint`)."""

from __future__ import annotations

import os

from torch import nn

from ..checkpoint import describe_checkpoint, find_checkpoint, load, read_meta
from ..data.imagefolder import IMAGEFOLDER
from ..data.tasks import evaluation_examples
from ..device import resolve_device
from ..errors import SoftshareError
from ..fold.report import Evaluator
from .algorithmic import evaluate_task_checkpoint, exact_match_by_iteration
from .classification import imagefolder_evaluator, test_set_evaluator


def run_config(path: str | os.PathLike) -> dict:
    """The resolved training config recorded in a run's (or checkpoint's) meta.json ({} if none)."""
    return read_meta(path).get("config") or {}


def evaluator_for(config: dict | None, device: str = "auto", dataset: str | None = None,
                  data_root: str | None = None, download: bool = False,
                  batch_size: int | None = None) -> Evaluator:
    """``evaluate(model) -> metrics`` (accuracy under "acc") on the test set of the run with `config`.

    Image classification: the test split of `dataset` (default: the run's), or the `val/` split of
    an ImageFolder (`imagefolder` with the run's or the given `data_root`). An algorithmic task:
    exact match on its test set at the training size, after every iteration the model runs (its
    trained count; more for a folded net whose loops were set to run longer); `dataset`, if
    given, must name that task.
    """
    config = config or {}
    task = config.get("task", "classification")
    if task == "classification":
        dataset = dataset or config.get("dataset")
        if not dataset:
            raise SoftshareError("the run does not record its dataset; pass --data NAME")
        if data_root is None and dataset == config.get("dataset"):
            data_root = config.get("data_root")
        if dataset == IMAGEFOLDER:  # streamed from disk: scored on its val/ split
            return imagefolder_evaluator(data_root, config.get("image_size", 224), device, batch_size or 500)
        return test_set_evaluator(dataset, data_root, download, device, batch_size or 500)
    if dataset is not None and dataset != task:
        raise SoftshareError(f"this run was trained on {task}; evaluate it with --data {task}")
    dev = resolve_device(device)
    x, y = evaluation_examples(config, config["train_size"], config["test_count"], data_root or config["data_root"])

    def exact_match(model: nn.Module) -> dict[str, float]:
        iterations = model.max_iterations or config["depth"]  # a folded net run longer counts every step
        return {"acc": exact_match_by_iteration(model.to(dev), task, x, y, iterations, batch_size or 100, dev)[-1]}

    return exact_match


CLI_FLAGS = {"fold": "--no-fold", "figure_format": "--format", "threshold": "--fold-threshold"}  # the task options not spelt as their flags


def evaluate_checkpoint(path: str, dataset: str | None = None, data_root: str | None = None,
                        download: bool = False, device: str = "auto", batch_size: int | None = None,
                        **task_options) -> dict:
    """Load a checkpoint and score it on the test split of its (or the given) dataset.

    A checkpoint trained on an algorithmic task is scored by exact match per test size and
    iteration instead, a soft-shared net folded to think longer (`task_options`: sizes,
    iterations, count, out, patience, fold, threshold, overwrite; see
    `eval.algorithmic.evaluate_task_checkpoint`).
    """
    ckpt_path = find_checkpoint(path)
    config = run_config(ckpt_path)
    task = config.get("task", "classification")
    if task != "classification":
        if dataset is not None and dataset != task:
            raise SoftshareError(f"{ckpt_path} was trained on {task}; --data {dataset} does not apply (drop it, or "
                                 f"give --data {task})")
        return evaluate_task_checkpoint(path, device=device, batch_size=batch_size or 100,
                                        data_root=data_root, **task_options)
    if task_options:
        flags = ", ".join(CLI_FLAGS.get(name, f"--{name}") for name in sorted(task_options))
        raise SoftshareError(f"{ckpt_path} is an image classifier; {flags} apply only to runs on an algorithmic "
                             f"task: drop {'it' if len(task_options) == 1 else 'them'}")
    if not (dataset or config.get("dataset")):
        raise SoftshareError(f"{ckpt_path} does not record its dataset; pass --data NAME")
    evaluate = evaluator_for(config, device, dataset, data_root, download, batch_size)
    meta = read_meta(ckpt_path)
    name = dataset or config["dataset"]
    return {"checkpoint": str(ckpt_path), "epoch": meta.get("epoch"), "chosen": describe_checkpoint(ckpt_path, meta),
            "dataset": name, "split": "val" if name == IMAGEFOLDER else "test", **evaluate(load(ckpt_path))}
