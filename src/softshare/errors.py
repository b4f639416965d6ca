"""One exception type for problems the user can fix.

The CLI turns a :class:`SoftshareError` into a single line on stderr and exit code 2, so every
message must say what is wrong *and* how to fix it. Library callers get an ordinary exception.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SoftshareError(ValueError):
    """A bad input, file or setting, described in one actionable sentence."""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> SoftshareError:
    """Error for an unknown `name`, listing the closest valid names (or all if none are close)."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    shown = close if close else valid
    hint = "did you mean" if close else "valid names"
    return SoftshareError(f"unknown {kind} {name!r}; {hint}: {', '.join(shown)}")
