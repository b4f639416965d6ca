"""Image classification as a Task: what every image classifier shares (cross-entropy, validation
metrics), and the datasets held in memory with on-device augmentation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import BatchLoader, load_dataset, split_indices
from ..eval.classification import classifier_sums, summarise
from ..storage import write_json
from ..models import create_model
from .task import Task


class ImageClassifierTask(Task):
    """What every image classifier's Task shares: a `train_loader` of (x, y) batches, cross-entropy
    with label smoothing, and validation metrics from `classifier_sums`."""

    primary_metric = "val_acc"
    unit = "images"
    train_loader: Any

    def batches_per_epoch(self) -> int:
        return len(self.train_loader)

    def batch_size_of(self, batch) -> int:
        return len(batch[1])

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.config.label_smoothing)
        return loss, (logits.argmax(1) == y).sum()

    @staticmethod
    def val_metrics(sums: torch.Tensor) -> dict[str, float]:
        metrics = summarise(sums)
        return {"val_loss": metrics["loss"], "val_acc": metrics["acc"], "val_top5_acc": metrics["top5_acc"]}


class ClassificationTask(ImageClassifierTask):
    """An image dataset held in memory (`data.load_dataset`), augmented on the device."""

    def __init__(self, config, device, dist) -> None:
        super().__init__(config, device, dist)
        data = load_dataset(config.dataset, root=config.data_root, download=config.download)
        self.data = data
        val_size = data.default_val_size if config.val_size is None else config.val_size
        self.train_idx, self.val_idx = split_indices(len(data.train_labels), val_size, config.seed)
        if val_size:
            train_x, train_y = data.train_images[self.train_idx], data.train_labels[self.train_idx]
            val_x, val_y = data.train_images[self.val_idx], data.train_labels[self.val_idx]
            self.eval_split = "validation"
        else:
            train_x, train_y, val_x, val_y = data.train_images, data.train_labels, data.test_images, data.test_labels
            self.eval_split = "test"
        common = dict(mean=data.mean, std=data.std, device=device, channels_last=config.channels_last,
                      seed=config.seed)
        self.train_loader = BatchLoader(train_x, train_y, batch_size=config.batch_size, shuffle=True,
                                        drop_last=True, crop_padding=config.crop_padding, flip=config.flip,
                                        cutout=config.cutout, rank=dist.rank, world_size=dist.world_size,
                                        **common)
        # Every rank scores the whole evaluation set: exact, and small next to an epoch of training.
        self.eval_loader = BatchLoader(val_x, val_y, batch_size=max(config.batch_size, 256), shuffle=False,
                                       drop_last=False, crop_padding=0, flip=False, cutout=0, **common)

    def build_model(self) -> nn.Module:
        return create_model(self.config.model, num_classes=self.data.num_classes,
                            in_channels=self.data.train_images.shape[1], **self.config.model_args)

    def train_batches(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.train_loader.iterate(epoch, start_batch=start_batch)

    def evaluate(self, model: nn.Module, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
        return self.val_metrics(classifier_sums(model, self.eval_loader.iterate(0), amp_dtype))

    def save_artifacts(self, run_path: Path) -> None:
        write_json(run_path / "split.json", {
            "dataset": self.config.dataset, "seed": self.config.seed, "evaluated_on": self.eval_split,
            "train_indices": self.train_idx.tolist(), "val_indices": self.val_idx.tolist()})
