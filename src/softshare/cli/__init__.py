"""The `softshare` command: one module per job, listed in `JOBS`. A job module defines

    def register(subparsers) -> None   # adds its parser (no help=: JOBS has it) and sets `func`

Only the job being run is imported (and with it the library code it needs), so `softshare
--help` and a job's own `--help` stay fast: `softshare --help` imports no torch at all.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
from collections.abc import Collection, Sequence

from ..errors import SoftshareError
from ..storage import describe_os_error
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
    """Run one job. Whatever happens, the user gets at most one line on stderr: a problem they can
    fix (exit 2), a write the machine refused (disk full, read-only, no permission: exit 2), or
    an interruption (Ctrl-C, however often pressed: exit 130)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    job = next((arg for arg in argv if not arg.startswith("-")), None)  # the top level has no valued options
    name = "softshare"
    try:
        args = build_parser({job} if job in JOBS else ()).parse_args(argv)
        name = f"softshare {args.job}"
        return int(args.func(args) or 0)
    except SoftshareError as err:
        return _fail(f"{name}: error: {err}", 2)
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return _fail(f"{name}: interrupted", 130)
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        return _fail(f"{name}: error: cannot write: {describe_os_error(err)}; free space or choose a writable "
                     f"place (what was already written is intact; a training run continues with --resume auto)", 2)


WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


def _fail(line: str, code: int) -> int:
    print(line, file=sys.stderr)
    return code


def _interrupt_once(signum, frame) -> None:
    """Ctrl-C outside training (which saves a checkpoint first): stop the job once, ignore more."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def entry() -> None:
    """The `softshare` command (and `python -m softshare`): `main`, with Ctrl-C pressed any number
    of times ending in one line, never a traceback (training's own handler saves a checkpoint on
    the first press and stops on the second; any other press stops the job once)."""
    signal.signal(signal.SIGINT, _interrupt_once)
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the exit itself cannot be interrupted
    sys.exit(code)
