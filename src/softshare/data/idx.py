"""MNIST and Fashion-MNIST from their gzipped IDX files, verified by decoded content.

Debian's `dataset-fashion-mnist` recompresses the files, so archive checksums cannot identify
them; instead every copy (found or downloaded) must decode to the expected magic numbers,
image size, counts and labels (and, for Fashion-MNIST, exact class balance).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import SoftshareError
from ..storage import atomic_path
from .dataset import ImageDataset, channel_stats, pad_images
from .download import download_file

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


@dataclass(frozen=True)
class IdxSpec:
    """One MNIST-style dataset: where to find it and what its decoded content must look like."""

    name: str
    title: str
    folder: str
    url: str
    classes: tuple[str, ...]
    balanced: bool
    debian_package: str | None = None
    system_dirs: tuple[str, ...] = ()
    train_count: int = 60000
    test_count: int = 10000
    val_size: int = 5000


SPECS = {
    "fashion_mnist": IdxSpec(
        "fashion_mnist", "Fashion-MNIST", "fashion-mnist",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
         "Ankle boot"),
        balanced=True, debian_package="dataset-fashion-mnist",
        system_dirs=("/usr/share/datasets/fashion-mnist",)),
    "mnist": IdxSpec("mnist", "MNIST", "mnist", "https://ossci-datasets.s3.amazonaws.com/mnist/",
                     tuple(str(d) for d in range(10)), balanced=False),
}


def read_idx(path: Path) -> np.ndarray:
    """Decode a gzipped IDX file of unsigned bytes: magic 00 00 08 <ndim>, big-endian int32 dims."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise SoftshareError(f"{path} is not a readable gzip file ({e}); delete it and fetch it again") from e
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise SoftshareError(f"{path} is not an IDX file of unsigned bytes (magic {raw[:4].hex() or 'missing'}, "
                             f"expected 000008xx); delete it and fetch it again")
    header = 4 + 4 * raw[3]
    dims = struct.unpack(f">{raw[3]}i", raw[4:header]) if len(raw) >= header else None
    if dims is not None and any(d < 0 for d in dims):
        raise SoftshareError(f"{path} is corrupt: its header has negative dimensions {dims}; delete it and fetch "
                             f"it again")
    if dims is None or len(raw) - header != math.prod(dims):
        raise SoftshareError(f"{path} is truncated or corrupt: its header promises dims {dims} but "
                             f"{max(len(raw) - header, 0)} data bytes follow; delete it and fetch it again")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _read_split(spec: IdxSpec, folder: Path, split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    images_path, labels_path = folder / FILES[f"{split}_images"], folder / FILES[f"{split}_labels"]
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.shape != (count, 28, 28) or labels.shape != (count,):
        raise SoftshareError(f"{spec.title} {split} files in {folder} hold images {images.shape} and labels "
                             f"{labels.shape}, expected ({count}, 28, 28) and ({count},); replace them "
                             f"with the originals from {spec.url}")
    per_class = np.bincount(labels, minlength=10)
    if len(per_class) > 10:
        raise SoftshareError(f"{labels_path} has labels above 9; replace it with the original from {spec.url}")
    if spec.balanced and (per_class != count // 10).any():
        raise SoftshareError(f"{labels_path} has class counts {per_class.tolist()}, expected {count // 10} "
                             f"each; replace it with the original from {spec.url}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _read_verified(spec: IdxSpec, folder: Path) -> tuple[torch.Tensor, ...]:
    return (*_read_split(spec, folder, "train", spec.train_count),
            *_read_split(spec, folder, "test", spec.test_count))


def _download(spec: IdxSpec, root: Path) -> tuple[torch.Tensor, ...]:
    """Fetch the four files, verify their content, then move them into place as one directory."""
    target = root / spec.folder
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
        for file in FILES.values():
            download_file(spec.url + file, Path(tmp) / file, f"download it yourself into {target}")
        arrays = _read_verified(spec, Path(tmp))
        with atomic_path(target) as out:
            out.mkdir()
            for file in FILES.values():
                os.replace(Path(tmp) / file, out / file)
    return arrays


def _missing(spec: IdxSpec, root: Path) -> SoftshareError:
    debian = (f", install Debian's {spec.debian_package} (files in {', '.join(spec.system_dirs)})"
              if spec.debian_package else "")
    return SoftshareError(f"{spec.title} not found: put {', '.join(FILES.values())} (from {spec.url}) in "
                          f"{root / spec.folder}{debian}, or pass download=True (--download on the command line)")


def load_idx_dataset(name: str, root: Path, download: bool = False, pad_to_32: bool = True) -> ImageDataset:
    """MNIST or Fashion-MNIST from `root`/<folder> or a system copy, else downloaded if allowed.

    `pad_to_32` zero-pads the 28x28 images to 32x32, the input size of the CIFAR-style models.
    Mean and std are measured on the (padded) training images the model will see.
    """
    spec = SPECS[name]
    candidates = [root / spec.folder, *map(Path, spec.system_dirs)]
    folder = next((d for d in candidates if all((d / f).is_file() for f in FILES.values())), None)
    if folder is not None:
        train_x, train_y, test_x, test_y = _read_verified(spec, folder)
    elif download:
        train_x, train_y, test_x, test_y = _download(spec, root)
    else:
        raise _missing(spec, root)
    if pad_to_32:
        train_x, test_x = pad_images(train_x, 32), pad_images(test_x, 32)
    mean, std = channel_stats(train_x)
    return ImageDataset(spec.name, train_x, train_y, test_x, test_y, 10, mean, std, spec.classes,
                        spec.val_size)
