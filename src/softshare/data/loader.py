"""The training batch loader: uint8 images on the device, augmented and normalised per batch there."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ..errors import SoftshareError
from .augment import random_crop, random_cutout, random_flip


def stream_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of `parts` (unlike Python's salted `hash`)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class BatchLoader:
    """Batches `(x, y)` of normalised, augmented images from uint8 tensors kept on `device`.

    Holding the whole dataset as uint8 on the device and augmenting whole batches with tensor
    ops keeps the GPU fed without worker processes. Augmentation follows the standard CIFAR
    recipe: random crop from a `crop_padding`-pixel black border, horizontal `flip` with
    probability 0.5, normalisation by `mean`/`std` (per channel, 0..1 scale), then a
    `cutout` x `cutout` Cutout hole; 0/False turns each off.

    Randomness is a pure function of `(seed, epoch, batch, rank)`: the sample order of an
    epoch comes from `(seed, epoch)` and the augmentation of a batch from
    `(seed, epoch, batch, rank)`, so `iterate(epoch, start_batch)` replays the rest of an epoch
    exactly (mid-epoch resume). With `world_size > 1`, rank `r` takes every `world_size`-th
    sample of the epoch's order starting at `r`, after dropping the last `N % world_size`
    samples so that all ranks run the same number of batches.
    """

    def __init__(self, images: Tensor, labels: Tensor, mean: Sequence[float], std: Sequence[float],
                 batch_size: int = 128, *, shuffle: bool = False, drop_last: bool = False,
                 crop_padding: int = 0, flip: bool = False, cutout: int = 0, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or labels.shape != images.shape[:1]:
            raise SoftshareError(f"BatchLoader needs uint8 images (N, C, H, W) and N labels, got "
                                 f"{images.dtype} {tuple(images.shape)} and {tuple(labels.shape)}")
        channels = images.shape[1]
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise SoftshareError(f"mean and std need {channels} values (std > 0) for {channels}-channel "
                                 f"images, got mean={tuple(mean)} std={tuple(std)}")
        if batch_size < 1 or crop_padding < 0 or cutout < 0 or not dtype.is_floating_point:
            raise SoftshareError(f"batch_size must be >= 1, crop_padding and cutout >= 0 and dtype a "
                                 f"float type; got {batch_size}, {crop_padding}, {cutout}, {dtype}")
        if not 0 <= rank < world_size:
            raise SoftshareError(f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}")
        self.device = torch.device(device) if device is not None else images.device
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.crop_padding, self.flip, self.cutout = crop_padding, flip, cutout
        self.channels_last, self.dtype = channels_last, dtype
        self.seed, self.rank, self.world_size = seed, rank, world_size
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._scale, self._shift = 1 / (255 * std_t), mean_t / std_t  # (x/255 - mean)/std
        self.samples_per_rank = len(labels) // world_size
        if len(self) == 0:
            raise SoftshareError(f"no batches: {self.samples_per_rank} samples per rank with batch_size "
                                 f"{batch_size} and drop_last=True; use a smaller batch size")

    def __len__(self) -> int:
        """Batches per epoch (on each rank)."""
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return -(-self.samples_per_rank // self.batch_size)

    def epoch_indices(self, epoch: int) -> Tensor:
        """This rank's sample indices, in order, for `epoch` (CPU; the same on every device type)."""
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed(self.seed, epoch)))
        else:
            order = torch.arange(n)
        return order[: self.samples_per_rank * self.world_size][self.rank :: self.world_size]

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield batches `start_batch`, ..., len(self) - 1 of `epoch`, identical to a full pass's."""
        if not 0 <= start_batch <= len(self):
            raise SoftshareError(f"start_batch must be in 0..{len(self)}, got {start_batch}")
        return self._batches(epoch, start_batch)

    def _batches(self, epoch: int, start_batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.epoch_indices(epoch).to(self.device)
        for b in range(start_batch, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self._transform(self.images[idx], epoch, b), self.labels[idx]

    def _transform(self, x: Tensor, epoch: int, batch: int) -> Tensor:
        gen = torch.Generator(self.device).manual_seed(stream_seed(self.seed, epoch, batch, self.rank))
        if self.crop_padding:
            x = random_crop(x, self.crop_padding, gen)
        if self.flip:
            x = random_flip(x, gen)
        x = x.to(torch.float32).mul_(self._scale).sub_(self._shift)
        if self.cutout:
            x = random_cutout(x, self.cutout, gen)
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
