"""Classifier evaluation: loss and top-1/top-5 error over a loader of (x, y) batches."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                        amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Sums over all batches, so the result is exact whatever the batch size.

    Returns loss (mean cross-entropy), acc/top1_error/top5_error, and count. Under DDP pass
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
    for x, y in batches:
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
    return {"loss": loss / count, "acc": top1 / count, "top1_error": 1 - top1 / count,
            "top5_error": 1 - top5 / count, "count": int(count)}


def evaluate_checkpoint(path: str, dataset: str | None = None, data_root: str | None = None,
                        download: bool = False, device: str = "auto", batch_size: int = 500) -> dict:
    """Load a checkpoint and score it on the test split of its (or the given) dataset."""
    from .checkpoint import find_checkpoint, load_checkpoint
    from .data import BatchLoader, load_dataset
    from .errors import SoftshareError
    from .train.run_dir import resolve_device

    ckpt_path = find_checkpoint(path)
    meta = load_checkpoint(ckpt_path).meta
    config = meta.get("config") or {}
    dataset = dataset or config.get("dataset")
    if not dataset:
        raise SoftshareError(f"{ckpt_path} does not record its dataset; pass --data NAME")
    from .checkpoint import load

    dev = resolve_device(device)
    model = load(ckpt_path, device=str(dev))
    data = load_dataset(dataset, root=data_root, download=download)
    expected = (meta["model"].get("num_classes"), meta["model"].get("in_channels"))
    if expected != (data.num_classes, data.train_images.shape[1]):
        raise SoftshareError(f"{ckpt_path} was built for {expected[0]} classes and {expected[1]} input channels; "
                             f"{dataset} has {data.num_classes} and {data.train_images.shape[1]}")
    loader = BatchLoader(data.test_images, data.test_labels, batch_size=batch_size, mean=data.mean, std=data.std,
                         device=dev, shuffle=False, drop_last=False, crop_padding=0, flip=False, cutout=0)
    result = evaluate_classifier(model, loader.iterate(0))
    return {"checkpoint": str(ckpt_path), "dataset": dataset, **result}
