"""CIFAR-10/100 from the official python-pickle batches, in a directory or the original .tar.gz.

The batches are pickles, so they are read with an unpickler that can rebuild numpy arrays and
nothing else: a tampered file cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import SoftshareError
from ..storage import atomic_path
from .dataset import ImageDataset
from .download import download_file, safe_extract
from .unpickle import AllowListUnpickler

_URL = "https://www.cs.toronto.edu/~kriz/"


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR variant lives and how its batches are keyed."""

    name: str
    title: str
    folder: str
    archive: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val_size: int = 5000

    @property
    def url(self) -> str:
        return _URL + self.archive

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


SPECS = {
    "cifar10": CifarSpec(
        "cifar10", "CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a", tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",), "batches.meta", b"labels", b"label_names", 10,
        tuple(v / 255 for v in (125.3, 123.0, 113.9)), tuple(v / 255 for v in (63.0, 62.1, 66.7))),
    "cifar100": CifarSpec(
        "cifar100", "CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85", ("train",), ("test",), "meta", b"fine_labels",
        b"fine_label_names", 100,
        tuple(v / 255 for v in (129.3, 124.1, 112.4)), tuple(v / 255 for v in (68.2, 65.4, 70.4))),
}

class _BatchUnpickler(AllowListUnpickler):
    what = "a CIFAR batch"  # numpy arrays (the default allow-list) are all a batch needs


def unpickle_batch(data: bytes, where: str) -> dict:
    """Load one CIFAR pickle (Python 2 strings come back as bytes keys: b'data', b'labels')."""
    try:
        obj = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # a damaged pickle can fail in many ways; all mean the same to the user
        raise SoftshareError(f"{where} is corrupt or not a CIFAR batch ({type(e).__name__}: {e}); "
                             f"delete it and extract or download the dataset again") from e
    if not isinstance(obj, dict):
        raise SoftshareError(f"{where} is not a CIFAR batch (a {type(obj).__name__}, not a dict); "
                             f"delete it and extract or download the dataset again")
    return obj


def _missing(spec: CifarSpec, root: Path) -> SoftshareError:
    return SoftshareError(
        f"{spec.title} not found in {root}: put the folder {spec.folder}/ (with {', '.join(spec.files)}) "
        f"or the archive {spec.archive} from {spec.url} there, or pass download=True (--download on the command line)")


def _read_folder(spec: CifarSpec, folder: Path) -> Iterator[tuple[str, str, bytes]]:
    for name in spec.files:
        path = folder / name
        if not path.is_file():
            raise SoftshareError(f"{path} is missing; extract {spec.archive} from {spec.url} into "
                                 f"{folder.parent} again (or delete {folder} and pass download=True, or --download)")
        yield name, str(path), path.read_bytes()


def _read_archive(spec: CifarSpec, archive: Path) -> Iterator[tuple[str, str, bytes]]:
    """Yield the wanted members in archive order: one pass over the gzip stream, no seeking."""
    wanted = {f"{spec.folder}/{name}": name for name in spec.files}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    yield wanted.pop(member.name), f"{archive}:{member.name}", tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise SoftshareError(f"{archive} is corrupt or truncated ({e}); delete it and download "
                             f"{spec.url} again (or pass download=True, or --download)") from e
    if wanted:
        raise SoftshareError(f"{archive} lacks {', '.join(sorted(wanted))}; it is not {spec.archive} "
                             f"from {spec.url}: replace it with the original")


def _parse_split(spec: CifarSpec, batches: list[tuple[str, dict]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for where, batch in batches:
        data, y = batch.get(b"data"), batch.get(spec.label_key)
        if isinstance(y, list) and all(isinstance(v, int) for v in y):
            y = np.array(y, dtype=np.int64)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == 3072 and isinstance(y, np.ndarray) and y.dtype.kind in "iu"
                and y.shape == (len(data),)):
            raise SoftshareError(f"{where} is not a {spec.title} batch: it needs uint8 b'data' of shape "
                                 f"(N, 3072) and N integer labels under {spec.label_key!r}; replace it "
                                 f"with the original file")
        y = y.astype(np.int64)
        if y.size and not (0 <= y.min() and y.max() < spec.num_classes):
            raise SoftshareError(f"{where} has labels outside 0..{spec.num_classes - 1}; replace it "
                                 f"with the original file")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _download(spec: CifarSpec, root: Path) -> None:
    """Fetch and MD5-check the archive, then extract it into place atomically."""
    root.mkdir(parents=True, exist_ok=True)
    hint = f"download {spec.url} yourself and put {spec.archive} in {root}"
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
        archive, extracted = Path(tmp) / spec.archive, Path(tmp) / "extracted"
        download_file(spec.url, archive, hint, md5=spec.md5)
        safe_extract(archive, extracted)
        if not (extracted / spec.folder).is_dir():
            raise SoftshareError(f"{spec.url} has no {spec.folder}/ folder; {hint}")
        with atomic_path(root / spec.folder) as out:
            os.replace(extracted / spec.folder, out)


def load_cifar(name: str, root: Path, download: bool = False) -> ImageDataset:
    """CIFAR-10 or -100 from `root`/<folder>, else `root`/<archive>, else downloaded if allowed."""
    spec = SPECS[name]
    folder, archive = root / spec.folder, root / spec.archive
    if not folder.is_dir() and not archive.is_file():
        if not download:
            raise _missing(spec, root)
        _download(spec, root)
    members = _read_folder(spec, folder) if folder.is_dir() else _read_archive(spec, archive)
    parsed = {file: (where, unpickle_batch(data, where)) for file, where, data in members}
    train_x, train_y = _parse_split(spec, [parsed[f] for f in spec.train_files])
    test_x, test_y = _parse_split(spec, [parsed[f] for f in spec.test_files])
    meta_where, meta = parsed[spec.meta_file]
    names = meta.get(spec.names_key)
    if not isinstance(names, list) or len(names) != spec.num_classes:
        raise SoftshareError(f"{meta_where} lacks the {spec.num_classes} class names under "
                             f"{spec.names_key!r}; replace it with the original file")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return ImageDataset(spec.name, train_x, train_y, test_x, test_y, spec.num_classes, spec.mean,
                        spec.std, classes, spec.val_size)
