"""Image classification on an ImageFolder streamed from disk (ImageNet): the Task for
`--dataset imagefolder --data-root DIR`."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import nn

from ..data.imagefolder import ImageFolderLoader, default_workers, scan_split
from ..errors import SoftshareError
from ..eval.classification import classifier_sums
from ..storage import write_json
from ..models import create_model
from .classification import ImageClassifierTask
from .distributed import all_reduce_sum

log = logging.getLogger("softshare.train")
MAX_NAMES_LOGGED = 1000  # per split and epoch; the count is always exact


class ImageFolderTask(ImageClassifierTask):
    """Train on `data_root/train`, evaluate on `data_root/val` (sharded over ranks, sums all-reduced)."""

    def __init__(self, config, device, dist) -> None:
        super().__init__(config, device, dist)
        if not config.data_root:
            raise SoftshareError("--dataset imagefolder needs --data-root DIR (a folder with train/<class>/ and "
                                 "val/<class>/ images)")
        self.train_split = scan_split(config.data_root, "train")
        self.val_split = scan_split(config.data_root, "val", self.train_split.classes)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist.enabled else 1
        self.workers = config.workers if config.workers >= 0 else default_workers(local_world)
        common = dict(size=config.image_size, seed=config.seed, rank=dist.rank, world_size=dist.world_size,
                      workers=self.workers, device=device, channels_last=config.channels_last)
        self.train_loader = ImageFolderLoader(self.train_split, train=True, batch_size=config.batch_size,
                                              flip=config.flip, **common)
        # Validation runs once an epoch: its workers start for it rather than idle in between.
        self.eval_loader = ImageFolderLoader(self.val_split, train=False, batch_size=config.batch_size,
                                             persistent=False, **common)
        self.skipped = {"train": 0, "val": 0}

    def build_model(self) -> nn.Module:
        return create_model(self.config.model, num_classes=len(self.train_split.classes), in_channels=3,
                            **self.config.model_args)

    def train_batches(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.skipped["train"] = 0
        yield from self.train_loader.iterate(epoch, start_batch)
        self.skipped["train"] = self._report("training", epoch, self.train_loader.skips.take())

    def evaluate(self, model: nn.Module, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
        sums = all_reduce_sum(classifier_sums(model, self.eval_loader.iterate(0), amp_dtype).to(self.device),
                              self.dist)
        self.skipped["val"] = self._report("validation", None, self.eval_loader.skips.take())
        return {**self.val_metrics(sums), "val_count": int(sums[3].item())}

    def epoch_metrics(self) -> dict[str, float]:
        return {"train_skipped_files": self.skipped["train"], "val_skipped_files": self.skipped["val"]}

    def _report(self, what: str, epoch: int | None, names: list[str]) -> int:
        """Gather every rank's unreadable files; rank 0 logs them in one line. Returns how many files."""
        if self.dist.enabled:
            gathered: list = [None] * self.dist.world_size
            torch_dist.all_gather_object(gathered, names)
            names = [name for part in gathered for name in part]
        names = sorted(set(names))  # a file can be met twice (drawn itself, and tried as a substitute)
        if names and self.dist.is_main:
            shown = ", ".join(names[:MAX_NAMES_LOGGED]) + (f", ... ({len(names) - MAX_NAMES_LOGGED} more)"
                                                             if len(names) > MAX_NAMES_LOGGED else "")
            when = f"epoch {epoch + 1}: " if epoch is not None else ""
            log.warning("%s%d unreadable %s file(s) skipped: %s", when, len(names), what, shown)
        return len(names)

    def save_artifacts(self, run_path: Path) -> None:
        write_json(run_path / "classes.json", {
            "data_root": str(self.train_split.root), "classes": list(self.train_split.classes),
            "train_images": len(self.train_split), "val_images": len(self.val_split), "workers": self.workers})
