"""Argument types and table printing shared by the CLI jobs."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from collections.abc import Iterator, Sequence

from ..storage import FIGURE_FORMATS


def _number(kind, predicate, what):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or not predicate(value):  # never inf or nan
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    parse.__name__ = what
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number(float, lambda v: v > 0, "a finite positive number")
nonnegative_float = _number(float, lambda v: v >= 0, "a finite non-negative number")
unit_float = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
similarity = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")  # a fold threshold (|cos|)


def json_object(text: str) -> dict:
    """A JSON object argument, e.g. ``--model-args '{"num_templates": 4}'``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({err.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"num_templates\": 4}}', got {text!r}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """Reports a bad argument in one line plus a pointer to --help (no usage dump), exit code 2.

    Subparsers inherit the class (argparse builds them with ``type(parent)``)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def add_overwrite(parser: argparse.ArgumentParser, what: str) -> None:
    """The one flag that lets a job replace something at its output path that it did not write."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} even if it holds something softshare did not write there "
                             f"(the old content stays intact until the new output is complete)")


def add_figure_format(parser: argparse.ArgumentParser) -> None:
    """The one flag choosing the format of a job's figures."""
    parser.add_argument("--format", dest="figure_format", choices=FIGURE_FORMATS, default="png",
                        help="figure format: png (raster, 200 dpi) or vector pdf / svg for a paper (default: png)")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text table; numbers right-aligned with thousands separators."""
    cells = [[f"{c:,}" if isinstance(c, int) else str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line([str(h) for h in headers]), line(["-" * w for w in widths])]
    return "\n".join(out + [line(r) for r in cells])


@contextlib.contextmanager
def log_to_stdout(*names: str) -> Iterator[None]:
    """Print the log lines of the named loggers while inside (jobs show progress; library use
    stays quiet)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
