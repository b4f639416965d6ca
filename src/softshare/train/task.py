"""What the generic training loop needs to know about a problem (image classification, mazes...)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .distributed import DistInfo


class Task(ABC):
    """A problem: how to build its model, feed batches, score a batch and evaluate.

    `train_batches(epoch, start_batch)` must be a pure function of (seed, epoch, batch index)
    so a run resumed mid-epoch sees exactly the batches it would have seen.
    """

    primary_metric: str = "val_acc"  # the first of `selection_metrics`: what results report as "best"
    # The 'best' checkpoint has the highest tuple of these metrics (compared in order; ties go to
    # the later epoch); a task sets both. A metric where lower is better enters negated
    # (`selection_key`), e.g. a loss.
    selection_metrics: tuple[str, ...] = ("val_acc",)
    unit: str = "examples"  # what `batch_size_of` counts: the progress line's rate is in these per second
    counts_correct: bool = True  # whether `loss` counts correct instances (a `train_acc` to report)
    eval_split: str = "validation"  # what `evaluate` scores: held-out training data, or "test"
    find_unused_parameters: bool = False  # DDP: a step may leave some parameters without gradient

    def __init__(self, config: TrainConfig, device: torch.device, dist: DistInfo) -> None:
        self.config, self.device, self.dist = config, device, dist

    @abstractmethod
    def build_model(self) -> nn.Module: ...

    @abstractmethod
    def batches_per_epoch(self) -> int:
        """Optimizer steps in one epoch (the lr schedule's and the progress line's unit)."""

    @abstractmethod
    def train_batches(self, epoch: int, start_batch: int) -> Iterator[Any]: ...

    @abstractmethod
    def batch_size_of(self, batch: Any) -> int: ...

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, number of correct instances) for one training batch."""

    @abstractmethod
    def evaluate(self, model: nn.Module, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
        """Validation metrics (keys prefixed `val_`), computed with the model in eval mode."""

    def selection_key(self, metrics: dict[str, float]) -> list[float] | None:
        """What picks the best checkpoint from an epoch's metrics; None when it was not evaluated."""
        if not all(name in metrics for name in self.selection_metrics):
            return None
        return [float(metrics[name]) for name in self.selection_metrics]

    def epoch_metrics(self) -> dict[str, float]:
        """Extra per-epoch numbers for metrics.jsonl (e.g. files skipped), after the epoch's evaluation."""
        return {}

    def save_artifacts(self, run_path: Path) -> None:
        """Write task files into the run directory (e.g. the validation split). Rank 0 only."""
