"""softshare: implicitly recurrent CNNs through soft parameter sharing.

A layer's weight is a learned mix of templates from a bank shared with other layers,
``W_i = sum_j alpha_ij * T_j`` (Savarese & Maire, ICLR 2019).

The names below are imported on first use (PEP 562), so ``import softshare`` and
``softshare --help`` load neither torch nor matplotlib until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "SoftshareError": "errors",
    **dict.fromkeys(("TemplateBank", "SharedLayer", "SharedConv1d", "SharedConv2d", "SharedLinear",
                     "init_coefficients", "named_banks", "set_iterations", "to_channels_last"), "layers"),
    **dict.fromkeys(("create_model", "list_models", "register_family"), "models"),
    **dict.fromkeys(("share", "unshare", "SharePlan"), "convert"),
    **dict.fromkeys(("tie", "TieResult", "fold_model"), "fold"),
    **dict.fromkeys(("layer_similarity", "LayerSimilarity", "recurrence_penalty"), "analysis.similarity"),
    **dict.fromkeys(("save_lsm", "plot_lsm"), "analysis.lsm"),
    **dict.fromkeys(("load", "save_checkpoint", "load_checkpoint", "load_into", "find_checkpoint", "read_meta",
                     "Checkpoint"), "checkpoint"),
    "param_groups": "train.optim",
    "fit": "train.fit",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'softshare' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, *(name for name in globals() if name.startswith("__"))})


if TYPE_CHECKING:  # what static tools and IDEs see
    from .analysis.lsm import plot_lsm, save_lsm
    from .analysis.similarity import LayerSimilarity, layer_similarity, recurrence_penalty
    from .checkpoint import Checkpoint, find_checkpoint, load, load_checkpoint, load_into, read_meta, save_checkpoint
    from .convert import SharePlan, share, unshare
    from .errors import SoftshareError
    from .fold import TieResult, fold_model, tie
    from .layers import (
        SharedConv1d,
        SharedConv2d,
        SharedLayer,
        SharedLinear,
        TemplateBank,
        init_coefficients,
        named_banks,
        set_iterations,
        to_channels_last,
    )
    from .models import create_model, list_models, register_family
    from .train.fit import fit
    from .train.optim import param_groups
