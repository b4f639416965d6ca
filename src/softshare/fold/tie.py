"""Tie layers whose coefficient vectors agree: folding for any model with template banks.

`fold_model` rewrites runs of blocks into loops, which needs a model family that declares its
blocks. `tie` needs nothing but banks (a `share()`-converted timm or Hugging Face model, your
own net): within each bank, layers whose coefficient vectors agree to |cos| >= threshold
become one *tie group*, and the group gets one weight ``W = sum_j u_j T_j`` (u: the group's
shared direction, as in folding) and each layer a scale ``c_i = <a_i, u>``, so layer i computes
with ``c_i W``. A tie group is stored as a bank of one template (W) whose layers' coefficients
are the scales, so the LSM, checkpoints, `unshare` and export keep working on the result.

Layers that agree with nothing keep their own weight exactly: they stay in their bank, or
become plain layers where that is smaller (a bank of k templates left with k layers or fewer).
A bank is tied only when that does not add parameters (a bank of 2 templates whose 4 layers
split into one agreeing pair and two loners would grow: it is left as it was and the result
says so), unless `allow_growth`. So by default `tie` never makes a model bigger.

Grouping (complete linkage, as folding): a layer joins the first group, in module order,
whose every member it agrees with; otherwise it starts a new group.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..analysis import abs_cosine
from ..errors import SoftshareError
from ..layers import TemplateBank, named_banks
from ..layers.structure import count_parameters, drop_unused_banks, module_names, replace_module, to_plain, to_shared
from .plan import DEFAULT_THRESHOLD, SIMILARITY_TOLERANCE, check_threshold, fit_residual, loop_direction

TIED, BANK, PLAIN = "tied", "bank", "plain"  # what became of a group of layers


@dataclass
class TieGroup:
    """Layers of one bank whose coefficient vectors agree (a single layer: agrees with nothing)."""

    bank: str
    layers: list[str]
    min_similarity: float  # smallest pairwise |cos| in the group (1 for a single layer)
    fit_error: float  # max_i |a_i - c_i u| / |a_i|: 0 when the vectors are exactly collinear
    scales: list[float]  # c_i (tied groups), else []
    outcome: str = TIED  # "tied": one weight and a scale per layer; "bank": left in its bank; "plain"

    @property
    def tied(self) -> bool:
        return self.outcome == TIED


@dataclass
class TieBank:
    """One bank before and after: its parameters (templates and coefficients) and why it was
    left alone when it was."""

    bank: str
    layers: int
    num_templates: int
    tied: bool
    params_before: int
    params_after: int
    reason: str = ""


@dataclass
class TieResult:
    model: nn.Module  # the input model, rewritten in place
    threshold: float
    groups: list[TieGroup] = field(default_factory=list)
    banks: list[TieBank] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    @property
    def tied_groups(self) -> list[TieGroup]:
        return [g for g in self.groups if g.tied]

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "params_before": self.params_before,
                "params_after": self.params_after, "banks": [asdict(b) for b in self.banks],
                "groups": [asdict(g) for g in self.groups]}

    def summary(self) -> str:
        """A few lines for people: the totals, then every bank left as it was and why."""
        tied = self.tied_groups
        kept = sum(len(g.layers) for g in self.groups if g.outcome == BANK)
        plain = sum(len(g.layers) for g in self.groups if g.outcome == PLAIN)
        change = self.params_after / self.params_before - 1 if self.params_before else 0.0
        lines = [f"tie(|cos| >= {self.threshold}): {sum(b.tied for b in self.banks)} of {len(self.banks)} banks "
                 f"tied; {sum(len(g.layers) for g in tied)} layers -> {len(tied)} tied weights, {kept} layers "
                 f"stay in their banks, {plain} become plain; parameters {self.params_before:,} -> "
                 f"{self.params_after:,} ({change:+.1%})"]
        for bank in self.banks:
            if bank.reason:
                lines.append(f"  kept  {bank.bank} ({bank.layers} layers, k={bank.num_templates}): {bank.reason}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def tie_groups(coefficients: torch.Tensor, threshold: float) -> list[list[int]]:
    """Partition layers (rows of (n, k) `coefficients`) into groups that agree pairwise."""
    check_threshold(threshold)
    similar = abs_cosine(coefficients) >= threshold - SIMILARITY_TOLERANCE
    groups: list[list[int]] = []
    for i in range(coefficients.shape[0]):
        home = next((g for g in groups if bool(similar[i, g].all())), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    return groups


def tie(model: nn.Module, threshold: float = DEFAULT_THRESHOLD, *, allow_growth: bool = False) -> TieResult:
    """Give every group of agreeing layers of each bank one weight and per-layer scales, in place.

    At threshold 1.0 on exactly collinear vectors the outputs do not change (up to rounding);
    below it each tied layer's coefficients are replaced by their projection ``c_i u``. Layers
    that agree with nothing are unchanged. A bank whose tying would add parameters is left as
    it was (named, with the reason, in the result) unless `allow_growth`.
    """
    check_threshold(threshold)
    banks = named_banks(model)
    if not banks:
        raise SoftshareError(f"{type(model).__name__} has no template banks to tie; share it first "
                             f"(softshare.share) or build a soft-shared model")
    before = count_parameters(model)
    names = module_names(model)
    result = TieResult(model, threshold)
    for bank_name, bank, users in banks:
        vectors = torch.stack([layer.coefficients.detach().to("cpu", torch.float64) for _, layer in users])
        similarity = abs_cosine(vectors)
        groups = tie_groups(vectors, threshold)
        agreeing = [g for g in groups if len(g) > 1]
        loners = [g[0] for g in groups if len(g) == 1]
        size, k, n = math.prod(bank.weight_shape), bank.num_templates, len(users)
        cost_before = k * size + n * k
        # the loners stay in the bank (its templates and their coefficients) or go plain, whichever is smaller
        in_bank, as_plain = (k * size + len(loners) * k if loners else 0), len(loners) * size
        cost_after = sum(size + len(g) for g in agreeing) + min(in_bank, as_plain)
        reason = ""
        if not agreeing:
            reason = f"no two layers agree to |cos| >= {threshold}"
        elif cost_after > cost_before and not allow_growth:
            reason = (f"{sum(len(g) for g in agreeing)} layers agree in {len(agreeing)} groups, but tying them "
                      f"would add {cost_after - cost_before:,} parameters (allow_growth=True ties anyway)")
        loner_outcome = BANK if reason or in_bank < as_plain else PLAIN
        result.banks.append(TieBank(bank_name, n, k, not reason, cost_before,
                                    cost_before if reason else cost_after, reason))
        for members in groups:
            layers = [users[i][1] for i in members]
            group = TieGroup(bank_name, [users[i][0] for i in members],
                             float(similarity[members][:, members].min()), 0.0, [],
                             TIED if len(members) > 1 and not reason else loner_outcome)
            result.groups.append(group)
            if group.outcome == BANK:
                continue
            if group.outcome == PLAIN:
                replacements = [to_plain(layers[0])]
            else:
                replacements, group.scales, group.fit_error = _tie_group(bank, layers, vectors[members])
            for layer, new in zip(layers, replacements):
                for name in names[id(layer)]:
                    replace_module(model, name, new)
                bank.detach(layer)
    drop_unused_banks(model)
    result.params_before, result.params_after = before, count_parameters(model)
    return result


def _tie_group(bank: TemplateBank, layers: list[nn.Module], vectors: torch.Tensor
               ) -> tuple[list[nn.Module], list[float], float]:
    """Layers drawing from a new one-template bank holding the group's weight W = mix(u)."""
    direction, scales = loop_direction(vectors)
    reference = bank.templates
    tied = TemplateBank(1, bank.weight_shape).to(reference.device, reference.dtype)
    with torch.no_grad():
        tied.templates.copy_(bank.mix(direction.to(reference.device))[None])
        tied.templates.requires_grad_(reference.requires_grad)
    new = []
    for layer, scale in zip(layers, scales):
        # to_shared takes hyperparameters from a plain layer: build the plain twin first (its
        # weight is not used), then give the tied layer its scale as its one coefficient
        shared = to_shared(to_plain(layer), tied)
        with torch.no_grad():
            shared.coefficients.copy_(scale.reshape(1))
        shared.coefficients.requires_grad_(layer.coefficients.requires_grad)
        new.append(shared)
    tied.train(bank.training)
    return new, [float(c) for c in scales], fit_residual(vectors, direction, scales)
