"""Mazes and prefix sums as a Task: data in memory, per-pixel/bit loss, the progressive loss.

Which model family suits which task lives here (`resolve_model_name`), and the training loss
(`task_loss`); the models themselves know no task names. Scoring (exact match per instance, every
size, the stopping rules) is `eval.algorithmic`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.tasks import IN_CHANNELS, evaluation_examples, examples, selection_examples, validation_count
from ..errors import SoftshareError
from ..eval.algorithmic import default_iterations, in_trained_layout, solve_mask, solved, think, thinking_net
from ..storage import write_json
from ..wrappers import unwrap_model
from ..models import create_model
from ..models.algorithmic import BODIES
from ..models.registry import check_model_args
from .config import TrainConfig
from .config_help import CUSTOM
from .task import Task

MODEL_PREFIX = {"mazes": "maze", "prefix-sums": "prefix"}  # task -> model-name prefix


class Batch(NamedTuple):
    x: Tensor  # float inputs (N, C, *spatial)
    y: Tensor  # int64 targets (N, *spatial)
    start: int  # progressive loss: iterations run without gradient first
    count: int  # ... then iterations run with gradient


def task_loss(task: str, logits: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Mean cross-entropy over the pixels that count (a maze's open pixels; every bit)."""
    mask = solve_mask(task, x)
    loss = F.cross_entropy(logits.float(), y, reduction="none")
    return loss.mean() if mask is None else (loss * mask).sum() / mask.sum().clamp_min(1)


def steps_per_epoch(config: TrainConfig, world_size: int = 1) -> int:
    """Optimizer steps in one epoch of an algorithmic run (the last partial batch is dropped)."""
    return config.train_count // (config.batch_size * world_size)


def resolve_model_name(task: str, model: str) -> str:
    """The registered name for `model` on `task`: short names ff/shared/recurrent map to the task's family."""
    prefix = MODEL_PREFIX.get(task)
    if prefix is None:
        raise SoftshareError(f"{task!r} is not an algorithmic task; use one of {', '.join(MODEL_PREFIX)}")
    if model in BODIES:
        return f"{prefix}_{model}"
    if model in {f"{prefix}_{body}" for body in BODIES}:
        return model
    names = ", ".join([*BODIES, *(f"{prefix}_{body}" for body in BODIES)])
    raise SoftshareError(f"model {model!r} cannot be trained on {task} (it needs a {prefix} model that "
                         f"predicts each {'pixel' if prefix == 'maze' else 'bit'}); use one of: {names}")


def check_model(config: TrainConfig) -> None:
    """Refuse an unknown or absurd model name and unknown --model-args keys, before any work
    (a custom task's model is the caller's own: nothing to check by name)."""
    if config.task == CUSTOM:
        return
    model = config.model if config.task == "classification" else resolve_model_name(config.task, config.model)
    check_model_args(model, config.model_args)


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
        self.unit = "mazes" if config.task == "mazes" else "strings"
        self.find_unused_parameters = config.alpha > 0  # the progressive loss runs only some iterations
        val_count = validation_count(config.to_dict())
        x, y = examples(config.task, config.train_size, config.train_count + val_count, config.seed,
                        root=config.data_root)
        self.train_x, self.train_y = self._to_device(x[:config.train_count]), y[:config.train_count].to(device)
        if val_count:
            self.val_x, self.val_y = x[config.train_count:], y[config.train_count:]
        else:  # val_size 0: train on all, evaluate on the test set at the training size
            self.val_x, self.val_y = evaluation_examples(config.to_dict(), config.train_size,
                                                         config.test_count, config.data_root)
            self.eval_split = "test"
        self.select_x = self.select_y = None
        if config.select_size:  # the best checkpoint is the one that thinks longest (see selection_metrics)
            self.select_x, self.select_y = selection_examples(config.to_dict(), config.select_size,
                                                              config.select_count, config.data_root)
            self.primary_metric = "val_extrap_acc"
            self.selection_metrics = ("val_extrap_acc", "val_acc")
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
        kwargs = {"width": config.width, "depth": config.depth, "blocks": config.blocks,
                  "lipschitz": config.lipschitz, "recall_relu": config.recall_relu,
                  "head_convs": config.head_convs, "recall_init": config.recall_init}
        if self.model_name.endswith("_shared"):
            kwargs["num_templates"] = config.num_templates
        return create_model(self.model_name, num_classes=2, in_channels=IN_CHANNELS[config.task],
                            **{**kwargs, **config.model_args})

    def batches_per_epoch(self) -> int:
        return steps_per_epoch(self.config, self.dist.world_size)

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
        """(1 - alpha) * loss after T iterations + alpha * progressive loss; correct = solved after T.

        The progressive loss continues, without gradient through them, from the state the full
        pass reached after its first n iterations: the same computation, not run twice (bit for
        bit; only DT-L with alpha < 1 rounds differently, as LAPACK takes another path for the
        spectral norms of a pass that tracks gradients).
        """
        alpha, task = self.config.alpha, self.config.task
        start = self._random_starts(model, batch.x)
        state = None
        with torch.set_grad_enabled(alpha < 1 and torch.is_grad_enabled()):
            first = start(model) if start else None
            if alpha and batch.start:
                logits, state = model(batch.x, self.config.depth, state_after=batch.start, state=first)
                state = state.detach()
            else:
                logits = model(batch.x, self.config.depth, state=first)
            full, right = task_loss(task, logits, batch.y, batch.x), solved(task, logits, batch.y, batch.x)
        if alpha == 0:
            return full, right.sum()
        if state is None and start:
            state = start(model)
        logits = model(batch.x, batch.count, start=batch.start, state=state)
        progressive = task_loss(task, logits, batch.y, batch.x)
        return (1 - alpha) * full + alpha * progressive, right.sum()

    def _random_starts(self, model: nn.Module, x: Tensor):
        """With `random_state` > 0: a function giving the batch's first thought, where that fraction
        of instances starts from a random state instead of the projection of its input (path
        independence, Anil et al. 2022: a net whose answer does not depend on where its thought
        starts has learned a step it can repeat). The draw is made once per batch, so every pass
        of the step starts alike; the others keep the projection, with its gradient."""
        fraction = self.config.random_state
        if not fraction:
            return None
        net = unwrap_model(model)
        with torch.no_grad():
            embedded = net.embed(x)
        shape = (len(x),) + (1,) * (embedded.dim() - 1)
        scale = embedded.pow(2).mean(dim=tuple(range(1, embedded.dim())), keepdim=True).sqrt()
        noise = torch.randn_like(embedded).abs_().mul_(scale)  # non-negative, like a state after a ReLU
        chosen = torch.rand(shape, device=x.device) < fraction
        return lambda _: torch.where(chosen, noise, net.embed(x))

    def evaluate(self, model: nn.Module, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
        """Exact match and loss on the held-out set at the training size, after T iterations; with
        `select_size`, also exact match at the stable stopping rule on held-out instances of that
        size, the net run as `softshare eval` runs it (a shared net folded, up to 20x T iterations)."""
        was_training = model.training
        model.eval()
        loss_sum, right, batch = 0.0, 0.0, max(self.config.batch_size, 256)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=amp_dtype or torch.bfloat16,
                                             enabled=amp_dtype is not None):
            for begin in range(0, len(self.val_y), batch):
                x = self._to_device(self.val_x[begin:begin + batch])
                y = self.val_y[begin:begin + batch].to(self.device)
                logits = model(x, self.config.depth)
                loss_sum += task_loss(self.config.task, logits, y, x).item() * len(y)
                right += solved(self.config.task, logits, y, x).sum().item()
        model.train(was_training)
        count = max(len(self.val_y), 1)
        metrics = {"val_loss": loss_sum / count, "val_acc": right / count}
        if self.select_x is not None:
            metrics.update(self._extrapolation(model, amp_dtype))
        return metrics

    def _extrapolation(self, model: nn.Module, amp_dtype: torch.dtype | None) -> dict[str, float]:
        """Validation exact match at the stable rule on the selection size (``val_extrap_acc``) and
        the mean iteration the rule stops at (``val_extrap_stop``)."""
        config = self.config
        net, _ = thinking_net(model)
        net = in_trained_layout(net, config.to_dict())
        iterations = default_iterations(net, config.depth)
        thought = think(net, config.task, self.select_x, self.select_y, iterations, max(config.batch_size, 100),
                        self.device, amp_dtype, until_settled=True)
        stable = thought["stop"]["stable"]
        return {"val_extrap_acc": stable["exact_match"], "val_extrap_stop": stable["mean_iteration"]}

    def save_artifacts(self, run_path: Path) -> None:
        """data.json: where the training and validation rows come from (reproducibility)."""
        config = self.config
        validation = (f"rows {config.train_count}..{config.train_count + len(self.val_y)} at the training size"
                      if validation_count(config.to_dict()) else "the test set at the training size")
        write_json(run_path / "data.json", {
            "task": config.task, "source": config.data_root or "generated", "seed": config.seed,
            "size": config.train_size, "train": f"rows 0..{config.train_count}", "validation": validation})
