"""Task data on disk in the public easy-to-hard layout, and loaders that check what they read.

Under a data root (the same root serves files written by ``softshare data`` and the public
benchmark's extracted archives)::

    ROOT/maze_data_{train,test}_{s}/inputs.npy      (N, 3, H, W), H = W = 2s + 6, RGB in {0, 1}
    ROOT/maze_data_{train,test}_{s}/solutions.npy   (N, H, W) path mask in {0, 1}
    ROOT/prefix_sums_data/len_{L}/{L}_data.npy      (N, L) bits, least significant first
    ROOT/prefix_sums_data/len_{L}/{L}_targets.npy   (N, L) running parity of the bits

softshare writes uint8 .npy files. The public data are float64 .npy files for mazes and float
tensors saved with ``torch.save`` as ``{L}_data.pth`` / ``{L}_targets.pth`` for prefix sums; the
loaders read either (``.npy`` first). Every directory is written atomically: a temporary sibling
renamed into place, so an error or Ctrl-C leaves no half-written set.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from ...errors import SoftshareError
from ...storage import atomic_path
from .mazes import Progress, check_maze_args, fill_mazes, image_side
from .prefix_sums import check_prefix_sum_args, prefix_sum_inputs

_FLOAT_OR_BYTE = (np.uint8, np.float32, np.float64)
_CHECK_ROWS = 4096


def maze_dir(root: str | os.PathLike, split: str, size: int) -> Path:
    """Directory of one maze set: ROOT/maze_data_{split}_{size}."""
    return Path(root) / f"maze_data_{split}_{size}"


def prefix_sum_dir(root: str | os.PathLike, length: int) -> Path:
    """Directory of one prefix-sum set: ROOT/prefix_sums_data/len_{length}."""
    return Path(root) / "prefix_sums_data" / f"len_{length}"


def write_mazes(root: str | os.PathLike, split: str, size: int, count: int, seed: int = 0,
                progress: Progress | None = None) -> Path:
    """Generate `count` mazes straight into ROOT/maze_data_{split}_{size} (memory-mapped, so sets
    larger than RAM work); same bytes as ``save_mazes(generate_mazes(...))``. Returns the directory."""
    check_maze_args(count, size, seed, split)
    side = image_side(size)
    target = maze_dir(root, split, size)
    with atomic_path(target) as tmp:
        tmp.mkdir()
        inputs = open_memmap(tmp / "inputs.npy", "w+", np.uint8, (count, 3, side, side))
        solutions = open_memmap(tmp / "solutions.npy", "w+", np.uint8, (count, side, side))
        fill_mazes(inputs, solutions, size, seed, split, progress)
        inputs.flush()
        solutions.flush()
        del inputs, solutions
    return target


def save_mazes(root: str | os.PathLike, split: str, size: int, inputs: np.ndarray,
               solutions: np.ndarray) -> Path:
    """Write uint8 maze arrays (as from `generate_mazes`) to ROOT/maze_data_{split}_{size}."""
    _check_mazes(inputs, solutions, size, "inputs", "solutions")
    _check_bytes(inputs, solutions)
    target = maze_dir(root, split, size)
    with atomic_path(target) as tmp:
        tmp.mkdir()
        np.save(tmp / "inputs.npy", inputs)
        np.save(tmp / "solutions.npy", solutions)
    return target


def load_mazes(root: str | os.PathLike, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a maze set: inputs float32 (N, 3, H, W) in [0, 1], targets int64 (N, H, W) in {0, 1}."""
    folder = maze_dir(root, split, size)
    fix = f"write it with `softshare data mazes --size {size} --split {split} --out {root}`"
    inputs_path, solutions_path = folder / "inputs.npy", folder / "solutions.npy"
    inputs = _read_npy(inputs_path, fix)
    solutions = _read_npy(solutions_path, fix)
    _check_mazes(inputs, solutions, size, str(inputs_path), str(solutions_path), fix)
    return maze_tensors(inputs, solutions)


def save_prefix_sums(root: str | os.PathLike, length: int, bits: np.ndarray,
                     targets: np.ndarray) -> Path:
    """Write uint8 (N, L) bits and targets to ROOT/prefix_sums_data/len_{L}/{L}_{data,targets}.npy."""
    _check_prefix_sums(bits, targets, length, "bits", "targets")
    _check_bytes(bits, targets)
    target = prefix_sum_dir(root, length)
    with atomic_path(target) as tmp:
        tmp.mkdir()
        np.save(tmp / f"{length}_data.npy", bits)
        np.save(tmp / f"{length}_targets.npy", targets)
    return target


def load_prefix_sums(root: str | os.PathLike, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a prefix-sum set (.npy, else the public .pth): inputs float32 (N, 1, L) in {-0.5, 0.5},
    targets int64 (N, L)."""
    folder = prefix_sum_dir(root, length)
    fix = f"write it with `softshare data prefix-sums --length {length} --out {root}`"
    arrays, paths = [], []
    for name in ("data", "targets"):
        npy, pth = folder / f"{length}_{name}.npy", folder / f"{length}_{name}.pth"
        path = npy if npy.is_file() else pth
        if not path.is_file():
            raise SoftshareError(f"{npy} not found (nor the public {pth.name}); {fix}")
        arrays.append(_read_npy(path, fix) if path == npy else _read_pth(path, fix))
        paths.append(str(path))
    _check_prefix_sums(*arrays, length, *paths, fix)
    return prefix_sum_tensors(*arrays)


def maze_tensors(inputs: np.ndarray, solutions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Training tensors from maze arrays: inputs float32 in [0, 1], targets int64."""
    return torch.from_numpy(np.array(inputs, np.float32)), torch.from_numpy(np.array(solutions, np.int64))


def prefix_sum_tensors(bits: np.ndarray, targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Training tensors from prefix-sum arrays: inputs float32 (N, 1, L) in {-0.5, 0.5}, targets int64."""
    return prefix_sum_inputs(np.array(bits, np.float32)), torch.from_numpy(np.array(targets, np.int64))


def _check_bytes(*arrays: np.ndarray) -> None:
    """Saved files are uint8: casting other dtypes could silently truncate values."""
    for array in arrays:
        if array.dtype != np.uint8:
            raise SoftshareError(f"expected uint8 arrays to save, got {array.dtype}; "
                                 f"convert with array.astype(np.uint8) after checking the values")


def _read_npy(path: Path, fix: str) -> np.ndarray:
    if not path.is_file():
        raise SoftshareError(f"{path} not found; {fix}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise SoftshareError(f"cannot read {path} ({err}); {fix}") from None


def _read_pth(path: Path, fix: str) -> np.ndarray:
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or foreign files
        raise SoftshareError(f"cannot read {path} ({type(err).__name__}: {err}); {fix}") from None
    if not isinstance(value, torch.Tensor):
        raise SoftshareError(f"{path} holds a {type(value).__name__}, not a tensor; {fix}")
    return value.numpy()


def _check_mazes(inputs: np.ndarray, solutions: np.ndarray, size: int, inputs_name: str,
                 solutions_name: str, fix: str = "pass arrays as returned by generate_mazes") -> None:
    side = image_side(size)
    if inputs.ndim != 4 or inputs.shape[1:] != (3, side, side) or len(inputs) == 0:
        raise SoftshareError(f"{inputs_name} has shape {inputs.shape}, expected (N, 3, {side}, {side}) "
                             f"with N > 0 for size-{size} mazes; {fix}")
    if solutions.shape != (len(inputs), side, side):
        raise SoftshareError(f"{solutions_name} has shape {solutions.shape}, expected "
                             f"{(len(inputs), side, side)} to match {inputs_name}; {fix}")
    _check_values(inputs, inputs_name, fix, binary=False)
    _check_values(solutions, solutions_name, fix, binary=True)


def _check_prefix_sums(bits: np.ndarray, targets: np.ndarray, length: int, bits_name: str,
                       targets_name: str, fix: str = "pass arrays as returned by generate_prefix_sums") -> None:
    if bits.ndim != 2 or bits.shape[1] != length or len(bits) == 0:
        raise SoftshareError(f"{bits_name} has shape {bits.shape}, expected (N, {length}) with N > 0; {fix}")
    if targets.shape != bits.shape:
        raise SoftshareError(f"{targets_name} has shape {targets.shape}, expected {bits.shape} "
                             f"to match {bits_name}; {fix}")
    _check_values(bits, bits_name, fix, binary=True)
    _check_values(targets, targets_name, fix, binary=True)


def _check_values(array: np.ndarray, name: str, fix: str, binary: bool) -> None:
    """Reject wrong dtypes and values outside [0, 1] (or {0, 1}): a mislabelled file trains silently."""
    if array.dtype not in _FLOAT_OR_BYTE:
        raise SoftshareError(f"{name} has dtype {array.dtype}, expected uint8 or float; {fix}")
    for begin in range(0, len(array), _CHECK_ROWS):  # in blocks: files may be memory-mapped and large
        block = array[begin:begin + _CHECK_ROWS]
        ok = (block == 0) | (block == 1) if binary else (block >= 0) & (block <= 1)
        if not ok.all():
            kind = "0 or 1" if binary else "in [0, 1]"
            raise SoftshareError(f"{name} has values that are not {kind}; {fix}")
