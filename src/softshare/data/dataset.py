"""The in-memory dataset record and the helpers every dataset reader shares."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import SoftshareError


@dataclass
class ImageDataset:
    """A whole image dataset in memory: uint8 images (N, C, H, W) and int64 labels.

    Images stay uint8 (4x smaller than float) so the loader can keep them on the training
    device; `mean`/`std` are per-channel on the 0..1 scale, used by the loader to normalise.
    `default_val_size` is how many training images the trainer holds out for validation
    unless told otherwise (0: train on everything, evaluate on the test set).
    """

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    default_val_size: int = 0

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise SoftshareError(f"{self.name}: {split} images must be uint8 (N, C, H, W), "
                                     f"got {images.dtype} {tuple(images.shape)}")
            if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
                raise SoftshareError(f"{self.name}: {split} labels must be int64 with one label per "
                                     f"image, got {labels.dtype} {tuple(labels.shape)}")
        channels = self.train_images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels or len(self.classes) != self.num_classes:
            raise SoftshareError(f"{self.name}: need {channels} mean/std values and {self.num_classes} "
                                 f"class names, got {len(self.mean)}, {len(self.std)}, {len(self.classes)}")

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std of uint8 images on the 0..1 scale.

    Counts pixel values per channel in chunks, so even 60000 images need no float copy.
    """
    levels = torch.arange(256, dtype=torch.float64) / 255
    counts = torch.zeros(images.shape[1], 256, dtype=torch.float64)
    for part in images.split(chunk):
        for c in range(images.shape[1]):
            counts[c] += torch.bincount(part[:, c].reshape(-1), minlength=256).double()
    total = counts.sum(1)
    mean = (counts * levels).sum(1) / total
    var = (counts * (levels - mean[:, None]) ** 2).sum(1) / total
    return tuple(mean.tolist()), tuple(math.sqrt(v) for v in var.tolist())


def split_indices(n: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded train/validation split of `n` training samples: (train_idx, val_idx), each sorted.

    The validation set is the first `val_size` entries of a permutation drawn from `seed`, so
    the split is reproducible from (n, val_size, seed) alone. `val_size=0` gives every index
    to training and an empty validation set.
    """
    if n < 1:
        raise SoftshareError("the dataset has no training images; check its files")
    if not 0 <= val_size < n:
        raise SoftshareError(f"val_size must be from 0 to {n - 1} for {n} training images (0 trains on all and "
                             f"evaluates on the test set), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def pad_images(images: Tensor, size: int) -> Tensor:
    """Zero-pad (N, C, h, w) images symmetrically to `size` x `size` (28x28 -> 32x32 for the WRNs)."""
    _, _, h, w = images.shape
    if h > size or w > size:
        raise SoftshareError(f"cannot pad {h}x{w} images to the smaller size {size}x{size}")
    top, left = (size - h) // 2, (size - w) // 2
    return torch.nn.functional.pad(images, (left, size - w - left, top, size - h - top))
