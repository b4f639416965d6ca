"""ImageFolder datasets (ImageNet's `train/<class>/*.JPEG`, `val/<class>/*.JPEG`) streamed from disk.

No torchvision: files are decoded with Pillow in `torch.utils.data.DataLoader` worker processes,
cropped and flipped there as uint8 (the standard recipe: random-resized crop + flip for
training, resize + centre crop for validation), and normalised on the training device.

Randomness is a pure function of `(seed, epoch, sample index)`, not of the worker that happens
to load a sample, so a run is reproducible with any number of workers and resumes mid-epoch
exactly. A file that cannot be decoded never stops a run: training replaces it by the next
readable sample of the dataset (the batch keeps its size, so DDP ranks stay in step),
validation leaves it out; either way the file is counted and named (see `SkipLog`).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import SoftshareError
from .loader import stream_seed

IMAGEFOLDER = "imagefolder"  # the dataset name (`--dataset imagefolder --data-root DIR`) that selects this reader
# Pillow opens these; the suffix only selects files, the decoder reads the content (a PNG
# named .JPEG, as ImageNet has, decodes as PNG).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 256 / 224  # validation resizes the shorter side to image_size * this, then centre-crops


@dataclass
class ImageFolderSplit:
    """One split's files: paths relative to `root` as a fixed-width bytes array and int64 labels.

    Numpy arrays rather than a list of Python strings, so forked DataLoader workers do not
    touch (and copy) a million refcounted objects.
    """

    root: Path
    classes: tuple[str, ...]
    paths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> Path:
        return self.root / os.fsdecode(self.paths[index])


def scan_split(root: str | os.PathLike, split: str, classes: Sequence[str] | None = None) -> ImageFolderSplit:
    """The images of `root/split/<class>/...` with labels by sorted class name.

    `classes` (the training split's) fixes the label order of another split, which must hold
    exactly those classes. Problems a user can fix raise one `SoftshareError` line.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise SoftshareError(f"--data-root {root} {what}; pass a folder holding train/<class>/ and val/<class>/")
    split_dir = root / split
    if not split_dir.is_dir():
        raise SoftshareError(f"{split_dir} is missing: an ImageFolder root needs train/<class>/ and val/<class>/ "
                             f"folders of images")
    try:
        found = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))
    except OSError as err:
        raise SoftshareError(f"cannot read {split_dir}: {err.strerror}") from None
    if not found:
        raise SoftshareError(f"{split_dir} has no class folders; put each class's images in {split_dir}/<class>/")
    if classes is not None and found != list(classes):
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise SoftshareError(f"{split_dir} must hold the training split's {len(classes)} classes; "
                             f"missing {missing[:5]}, extra {extra[:5]}")
    paths: list[bytes] = []
    labels: list[int] = []
    for label, name in enumerate(found):
        try:
            files = sorted(entry.name for entry in os.scandir(split_dir / name)
                           if entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file())
        except OSError as err:
            raise SoftshareError(f"cannot read {split_dir / name}: {err.strerror}") from None
        if not files:
            raise SoftshareError(f"class folder {split_dir / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                                 f"add images or remove the folder")
        paths += [os.fsencode(f"{split}/{name}/{f}") for f in files]
        labels += [label] * len(files)
    return ImageFolderSplit(root, tuple(found), np.array(paths, dtype=bytes), np.array(labels, dtype=np.int64))


# ----------------------------------------------------------------------------- transforms


def random_resized_crop_box(width: int, height: int, rng: random.Random, scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) as torchvision's RandomResizedCrop draws it: area
    fraction in `scale`, log-uniform aspect ratio in `ratio`, 10 tries, else a centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resize_centre_crop_box(width: int, height: int, resize: int, size: int) -> tuple[float, float, float, float]:
    """The source box that 'resize the shorter side to `resize`, then centre-crop `size`' reads."""
    scale = resize / min(width, height)
    side = size / scale  # the crop's side in source pixels
    return (width - side) / 2, (height - side) / 2, side, side


def decode(path: Path, box_for_size, size: int):
    """Open `path`, let JPEG decoding shrink by 2/4/8 where the crop stays >= `size` pixels
    (Pillow's draft mode: much less work for large photos), convert to RGB (CMYK, grey, palette
    and PNG files included) and return (image, crop box in its pixels)."""
    with open(path, "rb") as file:
        image = Image.open(file)
        width, height = image.size
        left, top, w, h = box_for_size(width, height)
        # request the whole image at the size that keeps the crop at >= size pixels
        want = (max(1, math.ceil(width * size / max(w, 1e-9))), max(1, math.ceil(height * size / max(h, 1e-9))))
        if want[0] < width and want[1] < height:
            image.draft("RGB", want)
        image.load()  # decodes; raises on corrupt data
    fx, fy = image.size[0] / width, image.size[1] / height
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return rgb, (left * fx, top * fy, (left + w) * fx, (top + h) * fy)


class ImageFolderDataset(Dataset):
    """Items are `(epoch, index)` pairs (from `ShardedBatchSampler`); each yields
    ``(uint8 HWC array of size x size, label, skipped file names)``.

    `train=True`: random-resized crop + flip drawn from ``(seed, epoch, index)``; an unreadable
    file is replaced by the next readable one. `train=False`: resize + centre crop; an
    unreadable file yields ``None`` as image (the collate function drops it).
    """

    def __init__(self, split: ImageFolderSplit, train: bool, size: int = 224, flip: bool = True,
                 seed: int = 0, max_substitutes: int = 50) -> None:
        self.split, self.train, self.size, self.flip, self.seed = split, train, size, flip, seed
        self.max_substitutes = max_substitutes

    def __len__(self) -> int:
        return len(self.split)

    def load(self, index: int, epoch: int) -> np.ndarray:
        """The transformed image of sample `index` in `epoch` (raises on an unreadable file)."""
        size = self.size
        if self.train:
            rng = random.Random(stream_seed(self.seed, epoch, index))
            image, box = decode(self.split.path(index), lambda w, h: random_resized_crop_box(w, h, rng), size)
            out = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
            if self.flip and rng.random() < 0.5:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            resize = round(size * RESIZE_RATIO)
            image, box = decode(self.split.path(index), lambda w, h: resize_centre_crop_box(w, h, resize, size), size)
            out = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
        return np.asarray(out, dtype=np.uint8)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        skipped: list[str] = []
        attempts = self.max_substitutes if self.train else 1
        for step in range(attempts):
            candidate = (index + step) % len(self.split)
            try:
                return self.load(candidate, epoch), int(self.split.labels[candidate]), skipped
            except Exception as err:  # any decoder failure (OSError, SyntaxError, ValueError, bombs...)
                name = os.fsdecode(self.split.paths[candidate])
                skipped.append(f"{name} ({type(err).__name__}: {str(err)[:80]})")
        return None, -1, skipped


def collate(samples: list) -> tuple[Tensor, Tensor, list[str]]:
    """Stack the readable samples into (B, H, W, 3) uint8 and (B,) int64; gather skipped names."""
    skipped = [name for _, _, names in samples for name in names]
    kept = [(image, label) for image, label, _ in samples if image is not None]
    if not kept:
        return torch.empty(0, 0, 0, 3, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), skipped
    images = torch.from_numpy(np.stack([image for image, _ in kept]))
    labels = torch.tensor([label for _, label in kept], dtype=torch.int64)
    return images, labels, skipped


class ShardedBatchSampler:
    """Batches of `(epoch, index)` for one rank, DistributedSampler-style.

    Training (`shuffle=True`): a permutation drawn from ``(seed, epoch)``, trimmed to a multiple
    of `world_size`, rank r taking every world_size-th sample from r; the last partial batch is
    dropped so every rank runs the same number of steps. Validation: every sample exactly once
    over all ranks (no padding, no drop), so the all-reduced counts are exact.
    Set `epoch` and `start_batch` before iterating (the DataLoader pulls indices in the main process).
    """

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.num_samples, self.batch_size, self.shuffle = num_samples, batch_size, shuffle
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start_batch = 0, 0

    def indices(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.rank, self.num_samples, self.world_size))
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(stream_seed(self.seed, epoch)))
        usable = self.num_samples // self.world_size * self.world_size
        return order[:usable][self.rank::self.world_size].tolist()

    def __len__(self) -> int:
        if self.shuffle:
            return self.num_samples // self.world_size // self.batch_size
        return -(-len(range(self.rank, self.num_samples, self.world_size)) // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.indices(self.epoch)
        for b in range(self.start_batch, len(self)):
            yield [(self.epoch, i) for i in order[b * self.batch_size:(b + 1) * self.batch_size]]


def default_workers(local_world_size: int = 1) -> int:
    """CPU cores available to this process divided among the processes on this node, at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cores = os.cpu_count() or 1
    return max(1, min(16, cores // max(local_world_size, 1) - 1)) if cores > 1 else 0


@dataclass
class SkipLog:
    """Unreadable files seen in one pass, to report once per epoch."""

    names: list[str] = field(default_factory=list)

    def add(self, names: Sequence[str]) -> None:
        self.names.extend(names)

    def take(self) -> list[str]:
        names, self.names = self.names, []
        return names


class ImageFolderLoader:
    """A DataLoader over one split that yields normalised (x, y) on `device`.

    Workers decode and crop; the uint8 batch travels pinned (CUDA) and is normalised there. The
    batch arrives as (B, H, W, 3), so ``permute(0, 3, 1, 2)`` is a free channels-last view.
    """

    def __init__(self, split: ImageFolderSplit, *, train: bool, batch_size: int, size: int = 224,
                 flip: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 0,
                 persistent: bool = True, device: torch.device | str = "cpu", channels_last: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if batch_size < 1 or size < 1 or workers < 0:
            raise SoftshareError(f"batch_size and image size must be >= 1 and workers >= 0, got {batch_size}, "
                                 f"{size}, {workers}")
        self.device = torch.device(device)
        self.dataset = ImageFolderDataset(split, train, size, flip, seed)
        self.sampler = ShardedBatchSampler(len(split), batch_size, train, seed, rank, world_size)
        if len(self.sampler) == 0:
            raise SoftshareError(f"no batches: {len(split)} images over {world_size} process(es) give fewer than "
                                 f"batch_size={batch_size} per process; use a smaller batch size")
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=workers, collate_fn=collate,
                                 pin_memory=self.device.type == "cuda", persistent_workers=persistent and workers > 0,
                                 prefetch_factor=4 if workers > 0 else None)
        self.channels_last = channels_last
        self.skips = SkipLog()
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._scale, self._shift = 1 / (255 * std_t), mean_t / std_t  # (x/255 - mean)/std

    def __len__(self) -> int:
        return len(self.sampler)

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches `start_batch`.. of `epoch` (identical to a full pass's), on the device."""
        if not 0 <= start_batch <= len(self):
            raise SoftshareError(f"start_batch must be in 0..{len(self)}, got {start_batch}")
        self.sampler.epoch, self.sampler.start_batch = epoch, start_batch
        return self._batches()

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels, skipped in self.loader:
            self.skips.add(skipped)
            if len(labels) == 0:
                continue  # validation batch of unreadable files only (training never empties a batch)
            yield self.normalise(images), labels.to(self.device, non_blocking=True)

    def normalise(self, images: Tensor) -> Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 on the device, channels-last unless told otherwise."""
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = x.mul_(self._scale).sub_(self._shift)
        return x if self.channels_last else x.contiguous()
