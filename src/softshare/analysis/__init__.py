"""Reading trained shared nets: layer similarity (|cos|, roles, the recurrence penalty), LSM
figures (matplotlib), parameter accounting. Imports `layers` and the bottom row (`errors`, `storage`
for writing figures, `wrappers`)."""

from .dynamics import coefficient_dynamics, pairs_over_training, plot_dynamics, random_similarity
from .lsm import LSM_DIR, plot_lsm, plot_lsm_history, read_lsm_history, record_lsm, save_lsm, short_layer_names
from .similarity import (
    FoldSite,
    LayerSimilarity,
    abs_cosine,
    block_runs,
    foldable_pairs,
    layer_similarity,
    recurrence_penalty,
    shared_roles,
)
from .stats import BankStats, SharingStats, sharing_stats

__all__ = [
    "abs_cosine", "LayerSimilarity", "layer_similarity", "FoldSite", "block_runs", "shared_roles",
    "recurrence_penalty", "LSM_DIR", "plot_lsm", "save_lsm", "record_lsm", "read_lsm_history", "plot_lsm_history",
    "short_layer_names", "BankStats", "SharingStats", "sharing_stats", "coefficient_dynamics", "plot_dynamics",
    "random_similarity", "pairs_over_training", "foldable_pairs",
]
