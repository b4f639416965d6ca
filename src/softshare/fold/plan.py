"""Which soft-shared blocks fold into which loop: sites, grouping rule, shared direction.

Grouping rule (complete linkage): consecutive blocks form a group when EVERY pair of them has
LSM >= threshold for EVERY shared layer role (for SWRN: their conv1 vectors are pairwise similar
and so are their conv2 vectors). This is exactly a square of the LSM figure above the threshold,
and it bounds every pair's misfit, not only the average. Being similar is hereditary (every
sub-run of a group is a group), so growing groups greedily from the left gives the fewest loops.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..analysis import FoldSite, abs_cosine, block_runs
from ..errors import SoftshareError
from ..layers import TemplateBank

DEFAULT_THRESHOLD = 0.99  # |cos| at or above which blocks fold: the one default of every fold

# Exactly collinear vectors score |cos| = 1 only up to rounding; threshold 1.0 means "collinear
# to rounding", so scores within this much of the threshold pass.
SIMILARITY_TOLERANCE = 1e-9


def foldable_sites(model: nn.Module) -> list[FoldSite]:
    """Every site (run of blocks, `analysis.block_runs`) in module order; raises if there is none."""
    if not any(isinstance(m, TemplateBank) for m in model.modules()):
        raise SoftshareError(
            f"{type(model).__name__} has no template banks: only soft-shared models fold into loops "
            "(e.g. swrn_28_10_2)")
    sites = block_runs(model)
    if not sites:
        raise SoftshareError(
            f"{type(model).__name__} has template banks but no foldable blocks (consecutive blocks in a "
            "ModuleList/Sequential whose shared layers are direct children, each role drawing from one bank)")
    return sites


def pairwise_similarity(coefficients: Tensor) -> Tensor:
    """(roles, n, n) |cos| between the blocks' vectors of each role, from (blocks, roles, k)."""
    return abs_cosine(coefficients.transpose(0, 1))


def find_groups(coefficients: Tensor, threshold: float) -> list[int]:
    """Lengths of the consecutive groups (in order, summing to the number of blocks).

    `coefficients` is (blocks, roles, k); see the module docstring for the rule.
    """
    check_threshold(threshold)
    similar = (pairwise_similarity(coefficients) >= threshold - SIMILARITY_TOLERANCE).all(dim=0)
    lengths: list[int] = []
    start = 0
    for index in range(1, coefficients.shape[0] + 1):
        if index == coefficients.shape[0] or not bool(similar[index, start:index].all()):
            lengths.append(index - start)
            start = index
    return lengths


def check_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise SoftshareError(f"the similarity threshold must be in (0, 1], got {threshold}")


def loop_direction(coefficients: Tensor) -> tuple[Tensor, Tensor]:
    """Shared unit direction u and per-iteration scales c_t = <a_t, u> for (n, k) vectors a_t.

    u is the leading right singular vector: it minimises sum_t |a_t - c_t u|^2, so c_t u is the
    best least-squares fit of every layer by one direction (exact for collinear vectors).
    Its sign makes c_0 >= 0.
    """
    _, _, vh = torch.linalg.svd(coefficients, full_matrices=False)
    direction = vh[0]
    scales = coefficients @ direction
    if scales[0] < 0:
        direction, scales = -direction, -scales
    return direction, scales


def fit_residual(coefficients: Tensor, direction: Tensor, scales: Tensor) -> float:
    """max_t |a_t - c_t u| / |a_t|: how far the worst of the (n, k) vectors a_t is from its fit c_t u
    (`loop_direction`), relative to its own length; 0 for exactly collinear vectors."""
    residual = (coefficients - scales[:, None] * direction).norm(dim=1) / coefficients.norm(dim=1).clamp_min(1e-300)
    return float(residual.max())
