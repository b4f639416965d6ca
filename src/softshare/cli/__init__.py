"""The `softshare` command. Each job is a module in this package defining

    ORDER: int           # position in `softshare --help`
    def register(subparsers) -> None   # adds its parser and sets `func=run`

Jobs import heavy library code inside `run`, so `softshare --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from ..errors import SoftshareError
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
    parser = build_parser()
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
