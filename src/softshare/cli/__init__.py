"""The `softshare` command: one module per job, listed in `JOBS`. A job module defines

    def register(subparsers) -> None   # adds its parser (no help=: JOBS has it) and sets `func`

Only the job being run is imported (and with it the library code it needs), so `softshare
--help` and a job's own `--help` stay fast: `softshare --help` imports no torch at all.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Collection, Sequence

from ..errors import SoftshareError
from ..version import __version__
from ._common import OneLineParser

# job -> (its module in this package, its line in `softshare --help`), in the order listed there
JOBS: dict[str, tuple[str, str]] = {
    "models": ("models", "list registered models and their parameter counts"),
    "params": ("params", "parameter table per template bank, and the saving"),
    "share": ("share", "convert any model to soft sharing: the plan, parameters before/after"),
    "train": ("train", "train a model (paper recipe presets, CPU/GPU/torchrun DDP)"),
    "eval": ("eval", "loss and top-1/top-5 error (or task exact-match) on the test set"),
    "curves": ("curves", "training curves of one or several runs in one figure (shared axes)"),
    "lsm": ("lsm", "layer similarity matrix (LSM) heatmaps of a trained model"),
    "fold": ("fold", "fold blocks with collinear coefficients into explicit loops"),
    "data": ("data", "generate maze / prefix-sum task data (easy-to-hard benchmark format)"),
    "experiment": ("experiment", "reproducible studies: algorithmic (ff vs shared vs recurrent), recurrence"),
    "convert-author": ("convert_author", "convert a checkpoint of the paper's reference code to a softshare "
                                         "checkpoint"),
    "demo": ("demo", "end-to-end demo: nets that learn prefix sums and think longer (make demo)"),
}


class _JobParsers:
    """The subparsers as a job's `register` sees them: its parser gets its line from JOBS."""

    def __init__(self, subparsers: argparse._SubParsersAction) -> None:
        self._subparsers = subparsers

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self._subparsers.add_parser(name, help=JOBS[name][1], **kwargs)


def build_parser(jobs: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The `softshare` parser with the full parsers of `jobs` (None: every job); the others are
    listed by name and help line only, without importing their modules."""
    parser = OneLineParser(
        prog="softshare",
        description="Implicitly recurrent CNNs through soft parameter sharing.",
    )
    parser.add_argument("--version", action="version", version=f"softshare {__version__}")
    subparsers = parser.add_subparsers(dest="job", metavar="JOB", required=True)
    for name, (module, help_line) in JOBS.items():
        if jobs is None or name in jobs:
            importlib.import_module(f"{__name__}.{module}").register(_JobParsers(subparsers))
        else:
            subparsers.add_parser(name, help=help_line)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job = next((arg for arg in argv if not arg.startswith("-")), None)  # the top level has no valued options
    parser = build_parser({job} if job in JOBS else ())
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SoftshareError as err:
        print(f"softshare {args.job}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"softshare {args.job}: interrupted", file=sys.stderr)
        return 130
