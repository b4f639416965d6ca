"""Unpickling files from the internet without running their code: only allow-listed globals.

A pickle can name any importable callable and call it while loading. The datasets (CIFAR
batches) and the author-checkpoint converter read pickles written by others, so both go through
`AllowListUnpickler`, which resolves only the globals it is given (numpy's array rebuilding by
default) and hands every other one to `refuse`: an error here, an inert stand-in in the converter.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

_NUMPY_CORE = getattr(np, "_core", None) or np.core

# numpy arrays as pickled by numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``).
NUMPY_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(f"numpy.{core}.multiarray", name): getattr(_NUMPY_CORE.multiarray, name)
       for core in ("core", "_core") for name in ("_reconstruct", "scalar")},
}


class AllowListUnpickler(pickle.Unpickler):
    """pickle.Unpickler resolving only the globals in `allowed`; the rest go to `refuse`."""

    allowed: Mapping[tuple[str, str], Any] = NUMPY_GLOBALS
    what = "this file"  # for the error message

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        return found if found is not None else self.refuse(module, name)

    def refuse(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in {self.what}")
