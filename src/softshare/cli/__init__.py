"""The `softshare` command. Each job is a module in this package defining

    ORDER: int           # position in `softshare --help`
    def register(subparsers) -> None   # adds its parser and sets `func=run`

Jobs import heavy library code inside `run`, so `softshare --help` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import pkgutil
import signal
import sys

from ..errors import SoftshareError
from ..io import describe_os_error
from ..version import __version__
from ._common import OneLineParser


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="softshare",
        description="Implicitly recurrent CNNs through soft parameter sharing.",
    )
    parser.add_argument("--version", action="version", version=f"softshare {__version__}")
    subparsers = parser.add_subparsers(dest="job", metavar="JOB", required=True)
    modules = [importlib.import_module(f"{__name__}.{info.name}")
               for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")]
    for module in sorted((m for m in modules if hasattr(m, "register")), key=lambda m: m.ORDER):
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one job. Whatever happens, the user gets at most one line on stderr: a problem they can
    fix (exit 2), a write the machine refused (disk full, read-only, no permission: exit 2), or
    an interruption (Ctrl-C, however often pressed: exit 130)."""
    job = "softshare"
    try:
        args = build_parser().parse_args(argv)
        job = f"softshare {args.job}"
        return int(args.func(args) or 0)
    except SoftshareError as err:
        return _fail(f"{job}: error: {err}", 2)
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return _fail(f"{job}: interrupted", 130)
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        return _fail(f"{job}: error: cannot write: {describe_os_error(err)}; free space or choose a writable "
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
