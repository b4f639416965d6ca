"""`softshare.fit`: train any model on any data through softshare's one training loop.

Your `nn.Module` (shared with `softshare.share`, a timm or transformers model, your own), your
DataLoader (or any re-iterable of batches) and your loss get what a registered model gets: the
run directory (config, metrics.jsonl, curves, train.log, loggers), crash-safe checkpoints and an
exact resume (`resume="auto"`), the run lock, progress lines, the LSM history of every bank
(`lsm_every`), the recurrence regulariser (`recurrence_reg`), EMA (`ema_decay`), the divergence
stop and torchrun DDP. Config fields are given by name: ``fit(model, loader, epochs=3, lr=0.01)``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.loader import stream_seed
from ..errors import SoftshareError
from ..layers.bank import TemplateBank
from ..storage import write_json
from .config import TrainConfig, resolve_config
from .config_help import CUSTOM
from .loop import run_training
from .task import Task

Loss = Callable[[Any, Any], Tensor]


def fit(model: nn.Module, train_data: Iterable, val_data: Iterable | None = None, *, loss: Loss | None = None,
        out_dir: str | os.PathLike = "runs", name: str | None = None, resume: str | None = None,
        **config: Any) -> Path:
    """Train `model` in place on `train_data`; returns the run directory (`out_dir/name`).

    Batches are ``(inputs, target)`` pairs (``model(inputs)``; tensors go to the run's device) or
    mappings (``model(**batch)``). `loss(output, target)` (a mapping batch: ``loss(output, batch)``)
    returns the mean loss; None is cross-entropy on class logits (``label_smoothing`` applies),
    which also reports accuracy and picks the best checkpoint by validation accuracy (else by
    the lowest validation loss; its checkpoint records it negated as ``best_metric``). `val_data` is scored after every ``eval_every`` epochs. `config` fields:
    see ``softshare train --help`` (e.g. ``epochs``, ``optimizer``, ``lr``, ``weight_decay``,
    ``schedule`` (default constant), ``recurrence_reg``, ``ema_decay``, ``lsm_every``, ``logger``,
    ``device``, ``seed``). Coefficients of shared layers never get weight decay.

    The torch RNG starts each epoch from ``(seed, epoch)``, so a shuffling DataLoader and random
    augmentation give the same batches when a killed run is continued with ``resume="auto"``
    (a run directory that holds a run is refused without it). Reload the weights with
    ``softshare.load_into(model, run_dir)``.
    """
    if not isinstance(model, nn.Module):
        raise SoftshareError(f"fit trains an nn.Module, got {type(model).__name__}")
    for what, data in (("train_data", train_data), ("val_data", val_data)):
        if isinstance(data, Iterator):
            raise SoftshareError(f"{what} is an iterator, which one epoch would use up: pass something each epoch "
                                 f"can iterate again (a DataLoader, a list of batches)")
    if resume not in (None, "auto"):
        raise SoftshareError(f"resume must be None or 'auto' (continue this run), got {resume!r}")
    kind = type(model)
    fields = {**config, "task": CUSTOM, "model": f"{kind.__module__}.{kind.__qualname__}", "out_dir": str(out_dir),
              "name": name or kind.__name__.lower()}
    train_config = resolve_config(overrides=fields)
    if train_config.lsm_every and not any(isinstance(module, TemplateBank) for module in model.modules()):
        raise SoftshareError(f"lsm_every records the Layer Similarity Matrix of template banks, and {kind.__name__} "
                             "has none; share it first (softshare.share(model)) or drop lsm_every")

    def build_task(config: TrainConfig, device: torch.device, dist) -> Task:
        return ModuleTask(config, device, dist, model, train_data, val_data, loss)

    result = run_training(train_config, build_task, resume=resume,
                          changes={key: getattr(train_config, key) for key in {*config, "epochs", "device"}})
    if result.interrupted:
        raise KeyboardInterrupt
    return Path(train_config.out_dir) / train_config.run_name()


class ModuleTask(Task):
    """The Task of `fit`: a given model, batches from the caller's iterables, the caller's loss."""

    unit = "examples"

    def __init__(self, config: TrainConfig, device: torch.device, dist, model: nn.Module, train_data: Iterable,
                 val_data: Iterable | None, loss: Loss | None) -> None:
        super().__init__(config, device, dist)
        self.model, self.train_data, self.val_data, self.loss_fn = model, train_data, val_data, loss
        self.counts_correct = loss is None
        self.primary_metric = "val_acc" if loss is None else "val_loss"
        self.selection_metrics = (self.primary_metric,)
        # torchrun: each rank takes every world_size-th batch, unless the loader already shards
        sampler = getattr(train_data, "sampler", None)
        self.shard = dist.enabled and not isinstance(sampler, torch.utils.data.DistributedSampler)
        try:
            total = len(train_data)  # type: ignore[arg-type]
        except TypeError:  # an iterable without a length: count one pass
            total = sum(1 for _ in train_data)
        self.per_epoch = total // dist.world_size if self.shard else total
        if self.per_epoch < 1:
            raise SoftshareError(f"train_data has {total} batches: too few for one step"
                                 f"{f' on each of {dist.world_size} processes' if self.shard else ''}")

    def build_model(self) -> nn.Module:
        return self.model

    def selection_key(self, metrics: dict[str, float]) -> list[float] | None:
        """Highest validation accuracy, or with a loss of the caller's own, lowest validation loss
        (negated: the key is compared as higher is better); ties go to the later epoch."""
        key = super().selection_key(metrics)
        return key if key is None or self.counts_correct else [-key[0]]

    def batches_per_epoch(self) -> int:
        return self.per_epoch

    def train_batches(self, epoch: int, start_batch: int) -> Iterator[Any]:
        """The epoch's batches from `start_batch` on. The RNG is seeded from (seed, epoch) before
        the loader starts (its order and augmentation), and the batches before `start_batch` are
        drawn and dropped; a run resumed mid-epoch then goes on with the RNG state it saved."""
        resumed = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        torch.manual_seed(stream_seed(self.config.seed, epoch))
        batches = iter(self.train_data)
        if self.shard:
            batches = itertools.islice(batches, self.dist.rank, None, self.dist.world_size)
        for index in range(start_batch):
            if next(batches, None) is None:
                raise SoftshareError(f"train_data gave only {index} batches in epoch {epoch + 1}, where the run "
                                     f"expects {self.per_epoch}: pass the same data to continue a run")
        if start_batch:
            torch.set_rng_state(resumed[0])
            if resumed[1] is not None:
                torch.cuda.set_rng_state_all(resumed[1])
        for batch in itertools.islice(batches, self.per_epoch - start_batch):
            yield self._on_device(batch)

    def batch_size_of(self, batch: Any) -> int:
        first = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[1]
        return len(first)

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor | int]:
        if isinstance(batch, Mapping):
            output = model(**batch)
            if self.loss_fn is not None:
                return self.loss_fn(output, batch), 0
            value = output["loss"] if isinstance(output, Mapping) else getattr(output, "loss", None)
            if value is None:
                raise SoftshareError("a mapping batch needs a model that returns its loss (output.loss or "
                                     "output['loss']), or fit(..., loss=fn) with fn(output, batch)")
            return value, 0
        inputs, target = batch[0], batch[1]
        output = model(inputs)
        if self.loss_fn is not None:
            return self.loss_fn(output, target), 0
        logits = output.float()
        return (F.cross_entropy(logits, target, label_smoothing=self.config.label_smoothing),
                (logits.argmax(dim=1) == target).sum())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
        """Loss (and accuracy, with the default loss) over all of `val_data`, on every rank."""
        if self.val_data is None:
            return {}
        was_training = model.training
        model.eval()
        loss_sum, correct, count = 0.0, 0.0, 0
        with torch.autocast(self.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            for batch in self.val_data:
                batch = self._on_device(batch)
                loss, right = self.loss(model, batch)
                n = self.batch_size_of(batch)
                loss_sum, correct, count = loss_sum + float(loss) * n, correct + float(right), count + n
        model.train(was_training)
        count = max(count, 1)
        return {"val_loss": loss_sum / count, **({"val_acc": correct / count} if self.counts_correct else {})}

    def save_artifacts(self, run_path: Path) -> None:
        """fit.json: what was trained on what (the model's class, batches, the loss)."""
        write_json(run_path / "fit.json", {
            "model": self.config.model, "train_batches_per_epoch": self.per_epoch,
            "validation": self.val_data is not None, "sharded_over_ranks": self.shard,
            "loss": "cross-entropy" if self.loss_fn is None else getattr(self.loss_fn, "__qualname__",
                                                                           type(self.loss_fn).__name__)})

    def _on_device(self, batch: Any) -> Any:
        """The batch with every tensor on the run's device (channels-last images if the run is)."""
        if isinstance(batch, Tensor):
            batch = batch.to(self.device, non_blocking=True)
            if self.config.channels_last and batch.dim() == 4 and batch.is_floating_point():
                batch = batch.contiguous(memory_format=torch.channels_last)
            return batch
        if isinstance(batch, Mapping):
            return {key: self._on_device(value) for key, value in batch.items()}
        if isinstance(batch, Sequence) and not isinstance(batch, str):
            values = [self._on_device(value) for value in batch]
            if hasattr(batch, "_fields"):  # a named tuple
                return type(batch)(*values)
            return tuple(values) if isinstance(batch, tuple) else values
        return batch
