"""Which soft-shared blocks fold into which loop: sites, grouping rule, shared direction.

Grouping rule (complete linkage): consecutive blocks form a group when EVERY pair of them has
LSM >= threshold for EVERY shared layer role (for SWRN: their conv1 vectors are pairwise similar
and so are their conv2 vectors). This is exactly a square of the LSM figure above the threshold,
and it bounds every pair's misfit, not only the average. Being similar is hereditary (every
sub-run of a group is a group), so growing groups greedily from the left gives the fewest loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import SoftshareError
from ..layers import SharedLayer, TemplateBank

# Exactly collinear vectors score |cos| = 1 only up to rounding; threshold 1.0 means "collinear
# to rounding", so scores within this much of the threshold pass.
SIMILARITY_TOLERANCE = 1e-9


@dataclass
class FoldSite:
    """A maximal run of consecutive blocks (children of one ModuleList/Sequential) whose direct
    children include the same shared layer roles, all drawing from one bank."""

    container: str  # module name of the ModuleList/Sequential, e.g. "stages.0.blocks"
    start: int  # index of the first block in the container
    blocks: list[nn.Module]
    roles: tuple[str, ...]
    bank: TemplateBank

    def coefficients(self) -> Tensor:
        """(blocks, roles, k) float64 coefficient vectors, on the CPU."""
        return torch.stack([
            torch.stack([getattr(block, role).coefficients.detach().to("cpu", torch.float64)
                         for role in self.roles])
            for block in self.blocks])


def _shared_roles(block: nn.Module) -> tuple[tuple[str, ...], set[int]]:
    children = [(name, child) for name, child in block.named_children() if isinstance(child, SharedLayer)]
    return tuple(name for name, _ in children), {id(child.bank) for _, child in children}


def foldable_sites(model: nn.Module) -> list[FoldSite]:
    """Every site in module (forward) order. Raises if the model shares nothing foldable."""
    if not any(isinstance(m, TemplateBank) for m in model.modules()):
        raise SoftshareError(
            f"{type(model).__name__} has no template banks: only soft-shared models fold into loops "
            "(e.g. swrn_28_10_2)")
    sites: list[FoldSite] = []
    for container_name, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        run: FoldSite | None = None
        for index, block in enumerate(container):
            roles, banks = _shared_roles(block)
            if not roles or len(banks) != 1:
                run = None
                continue
            bank = getattr(block, roles[0]).bank
            if run is not None and run.roles == roles and run.bank is bank:
                run.blocks.append(block)
            else:
                run = FoldSite(container_name, index, [block], roles, bank)
                sites.append(run)
    if not sites:
        raise SoftshareError(
            f"{type(model).__name__} has template banks but no foldable blocks (consecutive blocks in a "
            "ModuleList/Sequential whose shared layers are direct children using one bank)")
    return sites


def pairwise_similarity(coefficients: Tensor) -> Tensor:
    """(roles, n, n) |cos| between the blocks' vectors of each role; a zero vector scores 0."""
    per_role = coefficients.transpose(0, 1)  # (roles, n, k)
    norms = per_role.norm(dim=-1, keepdim=True)
    unit = torch.where(norms > 0, per_role / norms.clamp_min(1e-300), torch.zeros_like(per_role))
    return (unit @ unit.transpose(1, 2)).abs()


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
