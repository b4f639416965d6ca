"""Mazes and prefix sums as a Task: data in memory, per-pixel/bit loss, per-instance exact match.

Accuracy here is all-or-nothing per instance (every path pixel / every bit right), as in the
easy-to-hard benchmark: a maze with one wrong pixel is not solved.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SoftshareError
from ..io import write_json
from ..models import create_model
from ..models.algorithmic import resolve_model_name
from ..tasks import maze_dataset, prefix_sum_dataset
from .task import Task

IN_CHANNELS = {"mazes": 3, "prefix-sums": 1}


class Batch(NamedTuple):
    x: Tensor  # float inputs (N, C, *spatial)
    y: Tensor  # int64 targets (N, *spatial)
    start: int  # progressive loss: iterations run without gradient first
    count: int  # ... then iterations run with gradient


def examples(task: str, size: int, count: int, seed: int, split: str = "train", skip: int = 0,
             root: str | None = None) -> tuple[Tensor, Tensor]:
    """Rows [skip, skip + count) of a task set: generated from `seed`, or read from `root`.

    Prefix sums have no train/test streams (the public data are one file per length), so
    held-out sets at the training length are the rows after the training rows.
    """
    if task == "mazes":
        x, y = maze_dataset(size, skip + count, split=split, seed=seed, root=root)
    elif task == "prefix-sums":
        x, y = prefix_sum_dataset(size, skip + count, seed=seed, root=root)
    else:
        raise SoftshareError(f"{task!r} is not an algorithmic task; use mazes or prefix-sums")
    return x[skip:], y[skip:]


def validation_count(config: dict) -> int:
    """Held-out rows at the training size: `val_size`, or `test_count` when unset (0: none)."""
    return config["test_count"] if config["val_size"] is None else config["val_size"]


def evaluation_examples(config: dict, size: int, count: int, root: str | None = None) -> tuple[Tensor, Tensor]:
    """The test set at `size` of a run with resolved `config`: never seen in training or validation."""
    task, seed = config["task"], config["seed"]
    if task == "mazes":
        return examples(task, size, count, seed, "test", root=root)
    skip = config["train_count"] + validation_count(config) if size == config["train_size"] else 0
    return examples(task, size, count, seed, skip=skip, root=root)


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


class AlgorithmicTask(Task):
    """Training on mazes or prefix sums with the optional progressive loss of Bansal et al. (2022).

    Batches index a seeded permutation of the training rows; the permutation and the
    progressive-loss draws of an epoch come from ``default_rng([seed, epoch])``, so batch b of
    epoch e is the same whenever it is produced (exact mid-epoch resume).
    """

    primary_metric = "val_acc"

    def __init__(self, config, device, dist) -> None:
        super().__init__(config, device, dist)
        self.model_name = resolve_model_name(config.task, config.model)  # fail before making data
        val_count = validation_count(config.to_dict())
        x, y = examples(config.task, config.train_size, config.train_count + val_count, config.seed,
                        root=config.data_root)
        self.train_x, self.train_y = self._to_device(x[:config.train_count]), y[:config.train_count].to(device)
        if val_count:
            self.val_x, self.val_y = x[config.train_count:], y[config.train_count:]
        else:  # val_size 0: train on all, evaluate on the test set at the training size
            self.val_x, self.val_y = evaluation_examples(config.to_dict(), config.train_size,
                                                         config.test_count, config.data_root)
        self.per_step = config.batch_size * dist.world_size
        if config.train_count < self.per_step:
            raise SoftshareError(f"train_count {config.train_count} is smaller than one step's batch "
                                 f"({self.per_step}); raise --train-count or lower --batch-size")

    def _to_device(self, x: Tensor) -> Tensor:
        x = x.to(self.device)
        if self.config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def build_model(self) -> nn.Module:
        config = self.config
        kwargs = {"width": config.width, "depth": config.depth}
        if self.model_name.endswith("_shared"):
            kwargs["num_templates"] = config.num_templates
        return create_model(self.model_name, num_classes=2, in_channels=IN_CHANNELS[config.task],
                            **{**kwargs, **config.model_args})

    def batches_per_epoch(self) -> int:
        return self.config.train_count // self.per_step

    def train_batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        config, steps = self.config, self.batches_per_epoch()
        rng = np.random.default_rng([config.seed, epoch])
        order = torch.from_numpy(rng.permutation(config.train_count)).to(self.device)
        # progressive loss: n ~ U{0..T-1} iterations without gradient, then k ~ U{1..T-n} with it
        starts = rng.integers(0, config.depth, size=steps)
        counts = 1 + (rng.random(steps) * (config.depth - starts)).astype(np.int64)
        offset = self.dist.rank * config.batch_size
        for b in range(start_batch, steps):
            index = order[b * self.per_step + offset:b * self.per_step + offset + config.batch_size]
            yield Batch(self.train_x[index], self.train_y[index], int(starts[b]), int(counts[b]))

    def batch_size_of(self, batch: Batch) -> int:
        return len(batch.y)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        """(1 - alpha) * loss after T iterations + alpha * progressive loss; correct = solved after T."""
        alpha, task = self.config.alpha, self.config.task
        with torch.set_grad_enabled(alpha < 1 and torch.is_grad_enabled()):
            full, solved = score(task, model(batch.x, self.config.depth), batch.y, batch.x)
        if alpha == 0:
            return full, solved.sum()
        state = None
        if batch.start:
            with torch.no_grad():
                _, state = model(batch.x, batch.start, return_state=True)
        logits = model(batch.x, batch.count, start=batch.start, state=state)
        progressive = score(task, logits, batch.y, batch.x)[0]
        return (1 - alpha) * full + alpha * progressive, solved.sum()

    def evaluate(self, model: nn.Module, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
        """Exact match and loss on the held-out set at the training size, after T iterations."""
        was_training = model.training
        model.eval()
        loss_sum, solved, batch = 0.0, 0.0, max(self.config.batch_size, 256)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=amp_dtype or torch.bfloat16,
                                             enabled=amp_dtype is not None):
            for begin in range(0, len(self.val_y), batch):
                x = self._to_device(self.val_x[begin:begin + batch])
                y = self.val_y[begin:begin + batch].to(self.device)
                loss, right = score(self.config.task, model(x, self.config.depth), y, x)
                loss_sum += loss.item() * len(y)
                solved += right.sum().item()
        model.train(was_training)
        count = max(len(self.val_y), 1)
        return {"val_loss": loss_sum / count, "val_acc": solved / count}

    def save_artifacts(self, run_path: Path) -> None:
        """data.json: where the training and validation rows come from (reproducibility)."""
        config = self.config
        validation = (f"rows {config.train_count}..{config.train_count + len(self.val_y)} at the training size"
                      if validation_count(config.to_dict()) else "the test set at the training size")
        write_json(run_path / "data.json", {
            "task": config.task, "source": config.data_root or "generated", "seed": config.seed,
            "size": config.train_size, "train": f"rows 0..{config.train_count}", "validation": validation})


# -- evaluating a trained run on larger instances (softshare eval) ------------------------------
def default_iterations(model: nn.Module, trained: int) -> int:
    """ff/shared: their depth; recurrent: 4x the trained count, to see it extrapolate."""
    return model.max_iterations or 4 * trained


def evaluate_task_checkpoint(path: str, sizes: list[int] | None = None, iterations: int | None = None,
                             count: int | None = None, device: str = "auto", batch_size: int = 100,
                             data_root: str | None = None, out: str | None = None) -> dict:
    """Exact match per test size after each of 1..`iterations` iterations; writes JSON and a plot.

    Defaults come from the run's config: its test sizes, test count and seed (the test sets are
    disjoint from its training and validation rows). Outputs go to `out` (a .json path; the
    plot beside it as .png) or next to the checkpoint (`<run>/eval-<best|last>.json`).
    """
    from ..checkpoint import find_checkpoint, load, load_checkpoint
    from .run_dir import resolve_device

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
    result = {"checkpoint": str(ckpt_path), "task": config["task"], "model": meta["model"]["name"],
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


def plot_accuracy_vs_iterations(result: dict, path: Path) -> None:
    """One line per test size: exact match against the number of iterations run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4))
    for size, accuracy in result["accuracy"].items():
        ax.plot(result["iterations"], [100 * a for a in accuracy], label=f"size {size}")
    ax.axvline(result["trained_iterations"], color="grey", ls="--", lw=1, label="trained iterations")
    ax.set(xlabel="iterations", ylabel="exact match (%)", ylim=(-2, 102),
           title=f"{result['model']} ({result['task']}, trained at {result['train_size']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
