"""softshare: implicitly recurrent CNNs through soft parameter sharing.

A layer's weight is a learned mix of templates from a bank shared with other layers,
``W_i = sum_j alpha_ij * T_j`` (Savarese & Maire, ICLR 2019).
"""

from .analysis import LayerSimilarity, layer_similarity, plot_lsm, recurrence_penalty, save_lsm
from .checkpoint import Checkpoint, find_checkpoint, load, load_checkpoint, load_into, save_checkpoint
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
from .train.optim import param_groups
from .version import __version__

__all__ = [
    "SoftshareError",
    "TemplateBank",
    "SharedLayer",
    "SharedConv1d",
    "SharedConv2d",
    "SharedLinear",
    "init_coefficients",
    "named_banks",
    "to_channels_last",
    "create_model",
    "list_models",
    "register_family",
    "param_groups",
    "share",
    "unshare",
    "SharePlan",
    "tie",
    "TieResult",
    "layer_similarity",
    "LayerSimilarity",
    "load",
    "save_checkpoint",
    "load_checkpoint",
    "load_into",
    "find_checkpoint",
    "Checkpoint",
    "fold_model",
    "set_iterations",
    "save_lsm",
    "plot_lsm",
    "recurrence_penalty",
]
