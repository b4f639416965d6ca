"""One exception type for problems the user can fix.

The CLI turns a :class:`SoftshareError` into a single line on stderr and exit code 2, so every
message must say what is wrong *and* how to fix it. Library callers get an ordinary exception.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable
from types import ModuleType


class SoftshareError(ValueError):
    """A bad input, file or setting, described in one actionable sentence."""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> SoftshareError:
    """Error for an unknown `name`, listing the closest valid names (or all if none are close)."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    shown = close if close else valid
    hint = "did you mean" if close else "valid names"
    return SoftshareError(f"unknown {kind} {name!r}; {hint}: {', '.join(shown)}")


def import_optional(module: str, fix: str) -> ModuleType:
    """Import `module` (an optional dependency, or one the user named); a missing or broken one
    becomes one line ending in `fix`. A broken install raises anything at import (a torchvision
    wheel built for another torch: RuntimeError; a missing shared library: OSError), so every
    exception but an interrupt is caught here."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and (module == err.name or module.startswith(err.name + ".")):
            raise SoftshareError(f"no module named {err.name!r}; {fix}") from None
        raise SoftshareError(f"{module} is installed but fails to import ({_first_line(err)}); {fix}") from None
    except Exception as err:  # noqa: BLE001 - see the docstring
        raise SoftshareError(f"{module} is installed but fails to import ({_first_line(err)}); {fix}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__
