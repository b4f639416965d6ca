"""One epoch of training, step by step: the loss (the task's, plus the weighted recurrence penalty),
divergence checks, backward and clipping, the optimizer and EMA, the epoch's running sums, the
progress line and the per-step scalars; a stop request ends it early."""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..analysis import recurrence_penalty
from ..progress import Progress
from .config import TrainConfig
from .distributed import DistInfo, any_rank
from .loggers import MetricSink
from .monitor import LossMonitor, diverged
from .optim import learning_rate, set_learning_rate
from .task import Task

log = logging.getLogger("softshare.train")


class StopFlag:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop at the next step; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.info("signal %s received: saving a checkpoint and stopping after this step", signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Training:
    """What every step of a run uses, built once by the loop."""

    config: TrainConfig
    task: Task
    model: nn.Module  # the module whose weights are trained and saved
    train_model: nn.Module  # `model` itself, or it compiled / wrapped in DDP
    optimizer: torch.optim.Optimizer
    ema: AveragedModel | None
    device: torch.device
    dist: DistInfo
    autocast: torch.dtype | None  # bf16 autocast, or None
    monitor: LossMonitor
    stop: StopFlag
    run_path: Path
    progress: Progress
    sinks: list[MetricSink]


@dataclass
class EpochOutcome:
    """This rank's [task loss x n, correct, n, penalty x n] over the epoch's batches so far, its
    training seconds, and `stopped_at` (batches done) when a stop request ended it early."""

    sums: torch.Tensor
    seconds: float
    stopped_at: int | None = None


def recurrence_weight(config: TrainConfig, epoch: float) -> float:
    """The recurrence penalty's weight at (fractional) `epoch` under `config` (`scheduled_weight`)."""
    return scheduled_weight(config.recurrence_reg, epoch, config.recurrence_reg_start,
                            config.recurrence_reg_warmup, config.recurrence_reg_anneal)


def scheduled_weight(weight: float, epoch: float, start: float = 0.0, warmup: float = 0.0,
                     anneal: float = 0.0) -> float:
    """`weight` from epoch `start` on (0 before: the net learns its task as distinct layers before
    the pull ties them together), rising linearly from 0 over the next `warmup` epochs, and with
    `anneal` > 0 falling linearly to 0 at that epoch (a pull into recurrence that the net is then
    free to leave). One schedule for `softshare train` and the Lightning callback."""
    since = epoch - start
    if since < 0:
        return 0.0
    if warmup:
        weight *= min(1.0, since / warmup)
    if anneal:
        weight *= max(0.0, 1.0 - epoch / anneal)
    return weight


def step_loss(config: TrainConfig, task: Task, model: nn.Module, train_model: nn.Module, batch,
              autocast_dtype: torch.dtype | None, reg_weight: float | None = None
              ) -> tuple[torch.Tensor, float, float, object]:
    """The loss one step minimises: the task's loss through `train_model` (`model` itself, or it
    compiled / DDP-wrapped) plus the recurrence penalty weighted by `reg_weight` (default
    `config.recurrence_reg`). Returns (loss to backpropagate, task loss value, penalty value, what
    the task counts as correct)."""
    reg_weight = config.recurrence_reg if reg_weight is None else reg_weight
    with torch.autocast(task.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss, correct = task.loss(train_model, batch)
        penalty = (recurrence_penalty(model, config.recurrence_reach, config.recurrence_signed)
                   if config.recurrence_reg else None)
    loss_value = loss.item()  # the task loss alone: comparable with the validation loss
    penalty_value = penalty.item() if penalty is not None else 0.0
    if penalty is not None and reg_weight:
        loss = loss + reg_weight * penalty
    return loss, loss_value, penalty_value, correct


def step_backward(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """Gradients of `loss`, clipped when set; returns their norm (the caller checks it, then steps)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = (nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip) if config.grad_clip
            else nn.utils.get_total_norm(grads))
    return float(norm)


def train_epoch(t: Training, epoch: int, start_batch: int, sums_so_far: torch.Tensor | None) -> EpochOutcome:
    """Train epoch `epoch` from batch `start_batch` (a resumed run continues its sums)."""
    config, task, dist, device = t.config, t.task, t.dist, t.device
    t.model.train()
    sums = torch.zeros(4, dtype=torch.float64)  # on the host: no device sync per step
    if sums_so_far is not None:  # checkpoints from before the penalty column hold 3
        sums[:len(sums_so_far)] = sums_so_far
    done_before = float(sums[2])  # a resumed epoch's examples before this process: not in its rate
    per_epoch = task.batches_per_epoch()
    t.progress.describe(f"epoch {epoch + 1}/{config.epochs}")
    started = time.perf_counter()
    for index, batch in enumerate(task.train_batches(epoch, start_batch), start=start_batch):
        lr = learning_rate(config, epoch + index / per_epoch)
        set_learning_rate(t.optimizer, lr)
        reg_weight = recurrence_weight(config, epoch + index / per_epoch)
        loss, loss_value, penalty_value, correct = step_loss(config, task, t.model, t.train_model, batch, t.autocast,
                                                             reg_weight)
        total_value = loss_value + reg_weight * penalty_value  # what the step minimises
        problem = t.monitor.problem(total_value)
        if any_rank(problem is not None, dist, device):
            raise diverged(problem or "the loss exploded on another rank", epoch, index, t.run_path, config)
        norm = step_backward(config, t.model, t.optimizer, loss)
        if any_rank(not math.isfinite(norm), dist, device):
            raise diverged(f"the gradient norm became {norm}", epoch, index, t.run_path, config)
        t.optimizer.step()
        if t.ema is not None:
            t.ema.update_parameters(t.model)
        t.monitor.update(total_value)

        n = task.batch_size_of(batch)
        sums += torch.tensor([loss_value * n, float(correct), float(n), penalty_value * n], dtype=torch.float64)
        loss_sum, correct_sum, count, _ = sums.tolist()
        shown = {"loss": f"{loss_sum / count:.3f}", f"{task.unit}/s":
                 f"{(count - done_before) * dist.world_size / (time.perf_counter() - started):.0f}"}
        if task.counts_correct:
            shown["acc"] = f"{correct_sum / count:.3f}"
        t.progress.set(**shown)
        t.progress.update()
        step = epoch * per_epoch + index + 1
        if config.log_every and step % config.log_every == 0:
            scalars = {"train_loss": loss_value, "lr": lr}
            if config.recurrence_reg:
                scalars["train_recurrence_penalty"] = penalty_value
            for sink in t.sinks:
                sink.write_step(step, scalars)
        if any_rank(t.stop.requested, dist, device):
            return EpochOutcome(sums, time.perf_counter() - started, stopped_at=index + 1)
    return EpochOutcome(sums, time.perf_counter() - started)
