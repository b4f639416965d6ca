"""Classifier evaluation: loss and top-1/top-5 error over a loader of (x, y) batches, on the test
split of an in-memory dataset or the `val/` split of an ImageFolder."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..data import BatchLoader, ImageDataset, load_dataset
from ..data.imagefolder import ImageFolderLoader, default_workers, scan_split
from ..device import resolve_device
from ..errors import SoftshareError
from ..progress import progress

log = logging.getLogger("softshare.eval")


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                        amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Sums over all batches, so the result is exact whatever the batch size.

    Returns loss (mean cross-entropy), acc (top-1), top5_acc, and count. Under DDP pass
    each rank its shard and all-reduce `sums` yourself (see `classifier_sums`).
    """
    sums = classifier_sums(model, batches, amp_dtype)
    return summarise(sums)


@torch.no_grad()
def classifier_sums(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[sum loss, top-1 correct, top-5 correct, count] as a float64 tensor."""
    was_training = model.training
    model.eval()
    sums = None
    for x, y in progress(batches, "evaluating", unit="batch", log=log):
        if sums is None:
            sums = torch.zeros(4, dtype=torch.float64, device=y.device)
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y[:, None]
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                             hit[:, 0].sum().double(), hit.any(1).sum().double(),
                             torch.tensor(float(len(y)), device=y.device, dtype=torch.float64)])
    model.train(was_training)
    return sums if sums is not None else torch.zeros(4, dtype=torch.float64)


def summarise(sums: torch.Tensor) -> dict[str, float]:
    loss, top1, top5, count = sums.tolist()
    count = max(count, 1.0)
    return {"loss": loss / count, "acc": top1 / count, "top5_acc": top5 / count, "count": int(count)}


def test_set_evaluator(dataset: str, data_root: str | None = None, download: bool = False,
                       device: str = "auto", batch_size: int = 500) -> Callable[[nn.Module], dict[str, float]]:
    """``evaluate(model) -> metrics`` on the test split of an image dataset, data loaded once."""
    dev = resolve_device(device)
    data = load_dataset(dataset, root=data_root, download=download)
    loader = BatchLoader(data.test_images, data.test_labels, batch_size=batch_size, mean=data.mean, std=data.std,
                         device=dev, shuffle=False, drop_last=False)

    def evaluate(model: nn.Module) -> dict[str, float]:
        _check_fits(model, data)
        return evaluate_classifier(model.to(dev), loader.iterate(0))

    return evaluate


def imagefolder_evaluator(data_root: str | None, image_size: int = 224, device: str = "auto",
                          batch_size: int = 500, workers: int = -1) -> Callable[[nn.Module], dict]:
    """``evaluate(model) -> metrics`` on the `val/` split of an ImageFolder (one process), plus
    `skipped_files` and `skipped` (the unreadable files left out)."""
    if not data_root:
        raise SoftshareError("evaluating on an ImageFolder needs --data-root DIR (with train/ and val/)")
    classes = scan_split(data_root, "train").classes
    dev = resolve_device(device)
    loader = ImageFolderLoader(scan_split(data_root, "val", classes), train=False, batch_size=batch_size,
                               size=image_size, workers=workers if workers >= 0 else default_workers(),
                               persistent=False, device=dev)

    def evaluate(model: nn.Module) -> dict:
        built = getattr(model, "softshare_config", {}).get("num_classes")
        if built != len(classes):
            raise SoftshareError(f"the model was built for {built} classes; {data_root} has {len(classes)}: pass "
                                 f"the ImageFolder it was trained on")
        metrics = evaluate_classifier(model.to(dev), loader.iterate(0))
        skipped = sorted(set(loader.skips.take()))
        return {**metrics, "skipped_files": len(skipped), "skipped": skipped}

    return evaluate


def _check_fits(model: nn.Module, data: ImageDataset) -> None:
    config = getattr(model, "softshare_config", {})
    built = (config.get("num_classes"), config.get("in_channels"))
    if built != (data.num_classes, data.in_channels):
        raise SoftshareError(f"the model was built for {built[0]} classes and {built[1]} input channels; "
                             f"{data.name} has {data.num_classes} and {data.in_channels}: pass the dataset it "
                             f"was trained on")
