"""`softshare data mazes|prefix-sums`: write the algorithmic task sets to disk, deterministically."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..data.tasks import (check_maze_args, check_prefix_sum_args, generate_prefix_sums, image_side, maze_dir,
                          prefix_sum_dir, save_prefix_sums, write_mazes)
from ..errors import SoftshareError
from ..storage import check_output
from ._common import add_overwrite



def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data", description="Generate algorithmic task data offline in the public easy-to-hard layout. "
                    "The same arguments always give byte-identical files.")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)

    m = tasks.add_parser("mazes", help="perfect mazes and their solution paths",
                         description="Write OUT/maze_data_{split}_{size}/{inputs,solutions}.npy (uint8).")
    m.add_argument("--size", type=int, default=9,
                   help="odd maze size from 9 to 401; images are 2*size+6 pixels a side (default: 9)")
    m.add_argument("--count", type=int, default=1000, help="number of mazes (default: 1000)")
    m.add_argument("--split", choices=("train", "test"), default="train",
                   help="which split; each has its own random stream (default: train)")
    m.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    m.add_argument("--out", default="data", help="data root directory (default: ./data)")
    add_overwrite(m, "the set's directory under --out")
    m.set_defaults(func=run)

    s = tasks.add_parser("prefix-sums", help="bit strings and their running parity",
                         description="Write OUT/prefix_sums_data/len_{L}/{L}_{data,targets}.npy (uint8).")
    s.add_argument("--length", type=int, default=32, help="bits per string (default: 32)")
    s.add_argument("--count", type=int, default=10000,
                   help="number of strings; at most 2^length below length 24 (default: 10000)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.add_argument("--out", default="data", help="data root directory (default: ./data)")
    add_overwrite(s, "the set's directory under --out")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return _mazes(args) if args.task == "mazes" else _prefix_sums(args)


def _check_target(root: str, target: Path, files: tuple[str, ...], overwrite: bool) -> None:
    """Before generating: the root must be a directory and the set's folder new or an earlier set."""
    if Path(root).exists() and not Path(root).is_dir():
        raise SoftshareError(f"--out {root} is a file; the data root must be a directory: choose another --out")
    check_output(target, "data", overwrite=overwrite, legacy=files)


def _mazes(args: argparse.Namespace) -> int:
    check_maze_args(args.count, args.size, args.seed, args.split)  # fail before any output exists
    _check_target(args.out, maze_dir(args.out, args.split, args.size), ("inputs.npy", "solutions.npy"), args.overwrite)
    began = time.perf_counter()
    with tqdm(total=args.count, unit="maze", desc=f"mazes {args.size}", leave=False,
              disable=not sys.stderr.isatty()) as bar:
        path = write_mazes(args.out, args.split, args.size, args.count, args.seed, progress=bar.update)
    took = time.perf_counter() - began
    side = image_side(args.size)
    print(f"wrote {args.count:,} {args.split} mazes of size {args.size} ({side}x{side} images) "
          f"to {path} in {took:.2f} s ({args.count / took:,.0f} mazes/s)")
    return 0


def _prefix_sums(args: argparse.Namespace) -> int:
    check_prefix_sum_args(args.count, args.length, args.seed)
    _check_target(args.out, prefix_sum_dir(args.out, args.length),
                  (f"{args.length}_data.npy", f"{args.length}_targets.npy"), args.overwrite)
    bits, targets = generate_prefix_sums(args.count, args.length, args.seed)
    path = save_prefix_sums(args.out, args.length, bits, targets)
    print(f"wrote {args.count:,} bit strings of length {args.length} to {path}")
    return 0
