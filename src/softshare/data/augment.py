"""Whole-batch augmentations as tensor ops: no per-image Python loop, so they run on the GPU.

Each op has a deterministic form taking explicit per-image parameters and a `random_*` form
that draws those parameters from a generator, so the loader's randomness is reproducible and
the ops can be checked against a plain per-image implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def crop(images: Tensor, offsets: Tensor, padding: int) -> Tensor:
    """Zero-pad (B, C, H, W) images by `padding`, then cut each at its own (dy, dx) in `offsets` (B, 2).

    Offsets lie in [0, 2 * padding]; (padding, padding) returns the image unchanged. On uint8
    input the pads are black pixels, as in the standard recipe (pad before normalising).
    """
    _, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    rows = offsets[:, 0, None] + torch.arange(h, device=images.device)  # (B, H)
    cols = offsets[:, 1, None] + torch.arange(w, device=images.device)  # (B, W)
    padded = padded.gather(2, rows[:, None, :, None].expand(-1, c, -1, padded.shape[3]))
    return padded.gather(3, cols[:, None, None, :].expand(-1, c, h, -1))


def random_crop(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """`crop` at offsets drawn uniformly from [0, 2 * padding] per image and axis."""
    offsets = torch.randint(0, 2 * padding + 1, (images.shape[0], 2), generator=generator, device=images.device)
    return crop(images, offsets, padding)


def flip(images: Tensor, mask: Tensor) -> Tensor:
    """Mirror (left-right) the images where the boolean `mask` (B,) is true."""
    return torch.where(mask[:, None, None, None], images.flip(3), images)


def random_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """`flip` each image with probability 0.5."""
    return flip(images, torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5)


def cutout(images: Tensor, centres: Tensor, size: int) -> Tensor:
    """Zero one square per image: rows cy - size//2 .. cy + size//2 (exclusive), clipped to the image.

    Same geometry as the Cutout paper's code (DeVries & Taylor, 2017); applied to normalised
    images, so the hole is the dataset mean, i.e. zero.
    """
    _, _, h, w = images.shape
    half = size // 2
    ys = torch.arange(h, device=images.device)
    xs = torch.arange(w, device=images.device)
    in_rows = (ys >= centres[:, 0, None] - half) & (ys < centres[:, 0, None] + half)  # (B, H)
    in_cols = (xs >= centres[:, 1, None] - half) & (xs < centres[:, 1, None] + half)  # (B, W)
    hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return images.masked_fill(hole, 0)


def random_cutout(images: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """`cutout` with the centre drawn uniformly over the image's pixels."""
    b, _, h, w = images.shape
    cy = torch.randint(0, h, (b,), generator=generator, device=images.device)
    cx = torch.randint(0, w, (b,), generator=generator, device=images.device)
    return cutout(images, torch.stack([cy, cx], 1), size)
