"""A run's checkpoints: where training stands (`Position`) and writing it with the weights, so that
`resume` continues exactly (checkpoints/last; checkpoints/best; checkpoints/ema)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..checkpoint import save_checkpoint
from .config import TrainConfig
from .monitor import LossMonitor
from .run_dir import RunDir


@dataclass
class Position:
    """Where a run stands: `epoch` epochs done plus `batch` batches of the next, the best value of
    the task's primary metric so far and its epoch, the running sums of a partly done epoch, and
    the divergence monitor's level."""

    epoch: int = 0
    batch: int = 0
    best: list[float] | float | None = None  # the task's selection key (older runs: one number)
    best_epoch: int | None = None
    epoch_sums: torch.Tensor | None = None
    monitor: LossMonitor = field(default_factory=LossMonitor)


def save_training_checkpoint(run: RunDir, which: str, model: nn.Module, config: TrainConfig,
                             optimizer: torch.optim.Optimizer, position: Position, metrics: dict,
                             ema: AveragedModel | None = None) -> None:
    """Checkpoint `which` (last/best) at `position`; with `ema`, its state goes into the training
    state and its weights into checkpoints/ema."""
    state = {"epoch": position.epoch, "batch": position.batch, "optimizer": optimizer.state_dict(),
             "rng_cpu": torch.get_rng_state(), "best_metric": position.best, "best_epoch": position.best_epoch,
             "loss_monitor": position.monitor.state()}
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        state["rng_cuda"] = torch.cuda.get_rng_state()
    if position.epoch_sums is not None:
        state["epoch_sums"] = position.epoch_sums
    if ema is not None:
        state["ema"] = ema.state_dict()
        save_checkpoint(run.checkpoints / "ema", ema.module, config=config.to_dict(), epoch=position.epoch,
                        step=position.batch, metrics={k: v for k, v in metrics.items() if k.startswith("ema_")})
    save_checkpoint(run.checkpoints / which, model, config=config.to_dict(), epoch=position.epoch, step=position.batch,
                    metrics=metrics, best_metric=primary(position.best), train_state=state)


def as_key(best: float | list[float]) -> list[float]:
    """A recorded best as a selection key (runs before selection keys recorded one number)."""
    return list(best) if isinstance(best, (list, tuple)) else [best]


def primary(best: float | list[float] | None) -> float | None:
    """The primary metric of a selection key (what results and checkpoint metadata report)."""
    return None if best is None else as_key(best)[0]
