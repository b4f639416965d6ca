"""One call for the training code: a task set as tensors, read from disk or generated in memory."""

from __future__ import annotations

import os

import numpy as np
import torch

from ...errors import SoftshareError
from .files import load_mazes, load_prefix_sums, maze_tensors, prefix_sum_tensors
from .mazes import generate_mazes
from .prefix_sums import generate_prefix_sums


def maze_dataset(size: int, count: int, *, split: str = "train", seed: int = 0,
                 root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` size-`size` mazes: inputs float32 (N, 3, H, W) in [0, 1], targets int64 (N, H, W).

    With `root`, the first `count` of ROOT/maze_data_{split}_{size}; without, generated from
    `seed` exactly as `softshare data mazes` would write them.
    """
    if root is None:
        return maze_tensors(*generate_mazes(count, size, seed, split))
    return _first(load_mazes(root, split, size), count, f"maze_data_{split}_{size} under {root}")


def prefix_sum_dataset(length: int, count: int, *, seed: int = 0, root: str | os.PathLike | None = None,
                       stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` length-`length` bit strings: inputs float32 (N, 1, L) in {-0.5, 0.5}, targets int64 (N, L).

    With `root`, the first `count` of ROOT/prefix_sums_data/len_{length}; without, generated from
    `seed` exactly as `softshare data prefix-sums` would write them.
    """
    if root is None:
        return prefix_sum_tensors(*generate_prefix_sums(count, length, seed, stream))
    return _first(load_prefix_sums(root, length), count, f"prefix_sums_data/len_{length} under {root}")


def _first(tensors: tuple[torch.Tensor, torch.Tensor], count: int,
           where: str) -> tuple[torch.Tensor, torch.Tensor]:
    available = len(tensors[0])
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 0 < count <= available:
        raise SoftshareError(f"asked for {count!r} examples but {where} holds {available:,}; "
                             f"ask for 1..{available:,} or generate a larger set")
    return tensors[0][:count], tensors[1][:count]


# -- the rows a run uses -------------------------------------------------------------------------
IN_CHANNELS = {"mazes": 3, "prefix-sums": 1}  # the algorithmic tasks and their input channels


def examples(task: str, size: int, count: int, seed: int, split: str = "train", skip: int = 0,
             root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [skip, skip + count) of a task set: generated from `seed`, or read from `root`.

    Prefix sums have no train/test streams (the public data are one file per length), so
    held-out sets at the training length are the rows after the training rows.
    """
    if task == "mazes":
        x, y = maze_dataset(size, skip + count, split=split, seed=seed, root=root)
    elif task == "prefix-sums":
        x, y = prefix_sum_dataset(size, skip + count, seed=seed, root=root)
    else:
        raise SoftshareError(f"{task!r} is not an algorithmic task; use mazes or prefix-sums")
    return x[skip:], y[skip:]


def validation_count(config: dict) -> int:
    """Held-out rows at the training size of a run (resolved train `config`): `val_size`, or
    `test_count` when unset (0: none)."""
    return config["test_count"] if config["val_size"] is None else config["val_size"]


def evaluation_examples(config: dict, size: int, count: int,
                        root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The test set at `size` of a run with resolved `config`: never seen in training or validation."""
    task, seed = config["task"], config["seed"]
    if task == "mazes":
        return examples(task, size, count, seed, "test", root=root)
    skip = config["train_count"] + validation_count(config) if size == config["train_size"] else 0
    return examples(task, size, count, seed, skip=skip, root=root)


VALIDATION_STREAM = 1  # the generated prefix-sum stream that validation sets at other lengths come from


def selection_examples(config: dict, size: int, count: int,
                       root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out validation instances at a size other than the training size (what picks a run's
    best checkpoint): disjoint from the run's training rows and from every test set.

    Mazes: the "train" split at that size (a run trains at its own size only). Prefix sums: an
    independent generated stream; from public files (one file per length, tests take the first
    rows) the LAST `count` rows of the file.
    """
    task, seed = config["task"], config["seed"]
    if size == config["train_size"]:
        raise SoftshareError(f"the selection size must differ from the training size {size} (validation at "
                             f"the training size is val_size's rows)")
    if task == "mazes":
        return examples(task, size, count, seed, "train", root=root)
    if task != "prefix-sums":
        raise SoftshareError(f"{task!r} is not an algorithmic task; use mazes or prefix-sums")
    if root is None:
        return prefix_sum_dataset(size, count, seed=seed, stream=VALIDATION_STREAM)
    x, y = load_prefix_sums(root, size)
    if count + config["test_count"] > len(x):
        raise SoftshareError(f"prefix_sums_data/len_{size} under {root} holds {len(x):,} strings: too few for "
                             f"{config['test_count']:,} test and {count:,} validation strings; lower "
                             f"--select-count or --test-count")
    return x[len(x) - count:], y[len(y) - count:]
