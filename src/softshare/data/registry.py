"""Datasets by name: `load_dataset("cifar10")` and where their files live by default."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import unknown_name
from .cifar import load_cifar
from .dataset import ImageDataset
from .digits import load_digits_dataset
from .idx import load_idx_dataset

DATASETS = ("cifar10", "cifar100", "fashion_mnist", "mnist", "digits")


def default_data_root() -> Path:
    """`$SOFTSHARE_DATA` if set, else ~/.cache/softshare/data."""
    return Path(os.environ.get("SOFTSHARE_DATA") or "~/.cache/softshare/data").expanduser()


def canonical_name(name: str) -> str:
    """The registry name for `name` (`fashion-mnist` -> `fashion_mnist`); unknown names raise."""
    canonical = name.lower().replace("-", "_")
    if canonical not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    return canonical


def load_dataset(name: str, root: str | os.PathLike | None = None, download: bool = False, *,
                 pad_to_32: bool = True) -> ImageDataset:
    """Load a dataset into memory as uint8 tensors.

    Files are looked up under `root` (default: `default_data_root()`; Fashion-MNIST also in
    Debian's /usr/share/datasets/fashion-mnist) and fetched from the official source when
    missing and `download` is true (digits ships with scikit-learn and needs neither).
    `pad_to_32` zero-pads 28x28 (Fashion-)MNIST to 32x32.
    """
    name = canonical_name(name)
    root = Path(root).expanduser() if root is not None else default_data_root()
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, root, download)
    if name in ("fashion_mnist", "mnist"):
        return load_idx_dataset(name, root, download, pad_to_32)
    return load_digits_dataset()
