"""Fold a trained soft-shared model into an explicit-loop model with materialised weights.

Each foldable site (see `foldable_sites`) is partitioned into groups by `find_groups`; every
group becomes one `LoopBlock` whose shared layers carry the weight ``W = sum_j u_j T_j`` of the
group's direction u, computed once here, and whose scales are the c_t. Blocks that fold with
nothing else become loops of length 1 (their own weight, materialised the same way), so the
folded model has no template bank left and never mixes weights in forward.

The folded architecture is rebuilt by ``create_model(**config, fold={"loops": [...]})``: one
list of loop lengths per site, sites in module order. Its family must accept that `fold`
argument and build loops following the `LoopBlock` convention; the weights are then moved over
by name.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..analysis import FoldSite, sharing_stats
from ..errors import SoftshareError
from ..layers import LoopBlock, loop_blocks
from ..layers.structure import count_parameters
from ..models import create_model, list_families
from .plan import DEFAULT_THRESHOLD, find_groups, fit_residual, foldable_sites, loop_direction, pairwise_similarity


@dataclass
class FoldGroup:
    """One loop of the folded model and how well its blocks agreed."""

    container: str  # e.g. "stages.0.blocks"
    blocks: list[int]  # indices of the original blocks in that container
    min_similarity: float  # smallest pairwise |cos| over the group's pairs and roles (1 if alone)
    fit_error: float  # max_t,role |a_t - c_t u| / |a_t|: how far W_t is from c_t W in coefficients
    scales: dict[str, list[float]]  # c_t per role

    @property
    def length(self) -> int:
        return len(self.blocks)

    def to_dict(self) -> dict:
        return {"container": self.container, "blocks": self.blocks, "length": self.length,
                "min_similarity": self.min_similarity, "fit_error": self.fit_error, "scales": self.scales}


@dataclass
class FoldResult:
    model: nn.Module  # the folded model, in the original's mode, dtype and device
    threshold: float
    groups: list[FoldGroup]
    params_before: int
    params_after: int
    params_unshared: int  # the original architecture without sharing, for scale


    @property
    def loops(self) -> list[list[int]]:
        """The model's ``softshare_config["fold"]["loops"]``."""
        return self.model.softshare_config["fold"]["loops"]

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "loops": self.loops, "params_before": self.params_before,
                "params_after": self.params_after, "params_unshared": self.params_unshared,
                "groups": [g.to_dict() for g in self.groups]}


def plan_loops(model: nn.Module, threshold: float) -> list[list[int]]:
    """The loop lengths per site that `fold_model` would build, without building anything."""
    return [find_groups(site.coefficients(), threshold) for site in foldable_sites(model)]


def fold_model(model: nn.Module, threshold: float = DEFAULT_THRESHOLD) -> FoldResult:
    """Rebuild `model` with every group of mutually similar consecutive blocks as one loop.

    At threshold 1.0 on exactly collinear coefficients the folded model computes the same
    function (up to rounding); below it, each layer is replaced by its projection c_t u.
    """
    bad = next((name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if bad is not None:
        raise SoftshareError(f"the model has non-finite weights ({bad} holds NaN or inf), so no layers can be "
                             f"compared or folded; fold a checkpoint from before training diverged")
    sites = foldable_sites(model)
    loops = [find_groups(site.coefficients(), threshold) for site in sites]
    folded = _build_folded(model, loops)
    state, groups = _loop_state(sites, loops, folded)
    original = model.state_dict()
    for key in folded.state_dict():
        if key not in state:
            if key not in original:
                raise SoftshareError(f"the folded architecture has {key!r}, which the original model lacks; "
                                     "its model family builds `fold` loops inconsistently")
            state[key] = original[key]
    try:
        folded.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise SoftshareError(f"the folded weights do not fit the folded architecture ({err}); its model "
                             "family builds loops against the LoopBlock convention") from None
    folded.train(model.training)
    return FoldResult(folded, threshold, groups, count_parameters(model), count_parameters(folded),
                      sharing_stats(model).unshared_total)


def _build_folded(model: nn.Module, loops: list[list[int]]) -> nn.Module:
    config = getattr(model, "softshare_config", None)
    if not isinstance(config, dict) or "name" not in config:
        raise SoftshareError(f"{type(model).__name__} was not built by softshare.create_model, so its folded "
                             "architecture cannot be rebuilt; softshare.tie(model, threshold) ties its agreeing layers "
                             "without rebuilding (any model with banks)")
    family = next((f for f in list_families() if f.pattern.fullmatch(config["name"])), None)
    if family is None or "fold" not in inspect.signature(family.builder).parameters:
        raise SoftshareError(f"model {config['name']!r} belongs to a family that does not support folding "
                             "into loops (its builder takes no `fold` argument); softshare.tie(model, threshold) ties "
                             "its agreeing layers instead")
    folded = create_model(**{**config, "fold": {"loops": loops}})
    reference = next(model.parameters())
    return folded.to(device=reference.device, dtype=reference.dtype)


def _loop_state(sites: list[FoldSite], loops: list[list[int]],
                folded: nn.Module) -> tuple[dict[str, Tensor], list[FoldGroup]]:
    """State-dict entries of every LoopBlock of `folded`, and the group descriptions."""
    targets = loop_blocks(folded)
    expected = sum(len(lengths) for lengths in loops)
    if len(targets) != expected:
        raise SoftshareError(f"the folded architecture has {len(targets)} loops where {expected} were planned; "
                             "its model family builds `fold` loops inconsistently")
    state: dict[str, Tensor] = {}
    groups: list[FoldGroup] = []
    targets_iter = iter(targets)
    for site, lengths in zip(sites, loops):
        start = 0
        for length in lengths:
            name, loop = next(targets_iter)
            members = list(range(start, start + length))
            _check_loop(loop, name, length, site)
            group, entries = _fold_group(site, members)
            state.update({f"{name}.{key}": value for key, value in entries.items()})
            groups.append(group)
            start += length
    return state, groups


def _check_loop(loop: LoopBlock, name: str, length: int, site: FoldSite) -> None:
    if loop.length != length or loop.roles != site.roles:
        raise SoftshareError(f"folded loop {name} has length {loop.length} and roles {loop.roles}, "
                             f"expected {length} and {site.roles}; its model family builds loops inconsistently")


def _fold_group(site: FoldSite, members: list[int]) -> tuple[FoldGroup, dict[str, Tensor]]:
    coefficients = site.coefficients()[members]  # (n, roles, k)
    entries: dict[str, Tensor] = {}
    scales: dict[str, list[float]] = {}
    fit_error = 0.0
    for r, role in enumerate(site.roles):
        vectors = coefficients[:, r]
        direction, c = loop_direction(vectors)
        layer = getattr(site.blocks[members[0]], role)
        if layer.bias is not None:
            raise SoftshareError(f"{site.container}.{site.start + members[0]}.{role} has a bias; folding shared "
                                 "layers with biases is not supported")
        bank = site.banks[r]
        entries[f"{role}.weight"] = bank.mix(direction).detach()
        entries[f"scales.{role}"] = c.to(bank.templates.dtype)
        scales[role] = c.tolist()
        fit_error = max(fit_error, fit_residual(vectors, direction, c))
    for t, index in enumerate(members):
        for child_name, child in site.blocks[index].named_children():
            if child_name not in site.roles:
                entries.update({f"{child_name}.{t}.{key}": value for key, value in child.state_dict().items()})
    similarity = pairwise_similarity(coefficients)
    group = FoldGroup(site.container, [site.start + i for i in members], float(similarity.min()), fit_error, scales)
    return group, entries
