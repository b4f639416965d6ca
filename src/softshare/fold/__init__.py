"""Fold trained soft-shared models into networks with explicit loops (the paper's Sec. 4 claim).

``fold_model(model, threshold)`` groups consecutive blocks whose coefficient vectors are
(near) collinear and rebuilds the model with each group as one block run in a loop;
``tie(model, threshold)`` is the general form for any model with banks (one weight and
per-layer scales for each group of agreeing layers, no loop rewrite). Uses
`layers` (LoopBlock), `models` (to rebuild) and `analysis` (|cos|, block runs); never the reverse.
"""

from ..analysis import FoldSite
from ..layers import LoopBlock, loop_blocks, set_iterations
from .core import FoldGroup, FoldResult, count_parameters, fold_model, plan_loops
from .plan import DEFAULT_THRESHOLD, find_groups, foldable_sites, loop_direction
from .tie import TieBank, TieGroup, TieResult, tie, tie_groups
from .report import DEFAULT_THRESHOLDS, SweepRow, sweep, write_fold_report, write_sweep

__all__ = [
    "fold_model", "plan_loops", "tie", "tie_groups", "TieResult", "TieGroup", "TieBank", "FoldResult", "FoldGroup", "count_parameters",
    "LoopBlock", "loop_blocks", "set_iterations",
    "FoldSite", "foldable_sites", "find_groups", "loop_direction",
    "sweep", "SweepRow", "write_sweep", "write_fold_report", "DEFAULT_THRESHOLD", "DEFAULT_THRESHOLDS",
]
