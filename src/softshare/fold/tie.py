"""Tie layers whose coefficient vectors agree: folding for any model with template banks.

`fold_model` rewrites runs of blocks into loops, which needs a model family that declares its
blocks. `tie` needs nothing but banks (a `share()`-converted timm or Hugging Face model, your
own net): within each bank, layers whose coefficient vectors agree to |cos| >= threshold
become one *tie group*, and the group gets one weight ``W = sum_j u_j T_j`` (u: the group's
shared direction, as in folding) and each layer a scale ``c_i = <a_i, u>``, so layer i computes
with ``c_i W``. A tie group is stored as a bank of one template (W) whose layers' coefficients
are the scales, so the LSM, checkpoints, `unshare` and export keep working on the result.
A layer tied to nothing becomes a plain layer with its own mixed weight (exact).

Grouping (complete linkage, as folding): a layer joins the first group, in module order,
whose every member it agrees with; otherwise it starts a new group.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..analysis import abs_cosine
from ..errors import SoftshareError
from ..layers import TemplateBank, named_banks
from ..layers.structure import count_parameters, drop_unused_banks, module_names, replace_module, to_plain, to_shared
from .plan import DEFAULT_THRESHOLD, SIMILARITY_TOLERANCE, check_threshold, fit_residual, loop_direction


@dataclass
class TieGroup:
    """Layers of one bank that now use one weight."""

    bank: str
    layers: list[str]
    min_similarity: float  # smallest pairwise |cos| in the group (1 for a single layer)
    fit_error: float  # max_i |a_i - c_i u| / |a_i|: 0 when the vectors are exactly collinear
    scales: list[float]  # c_i

    @property
    def tied(self) -> bool:
        return len(self.layers) > 1


@dataclass
class TieResult:
    model: nn.Module  # the input model, rewritten in place
    threshold: float
    groups: list[TieGroup] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "params_before": self.params_before,
                "params_after": self.params_after, "groups": [asdict(g) for g in self.groups]}

    def summary(self) -> str:
        tied = [g for g in self.groups if g.tied]
        layers = sum(len(g.layers) for g in self.groups)
        return (f"tie(|cos| >= {self.threshold}): {layers} shared layers -> {len(tied)} tied weights for "
                f"{sum(len(g.layers) for g in tied)} layers + {len(self.groups) - len(tied)} plain layers; "
                f"parameters {self.params_before:,} -> {self.params_after:,}")


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


def tie(model: nn.Module, threshold: float = DEFAULT_THRESHOLD) -> TieResult:
    """Give every group of agreeing layers of each bank one weight and per-layer scales, in place.

    At threshold 1.0 on exactly collinear vectors the outputs do not change (up to rounding);
    below it each tied layer's coefficients are replaced by their projection ``c_i u``.
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
        for members in tie_groups(vectors, threshold):
            layers = [users[i][1] for i in members]
            if len(members) == 1:
                replacements = [to_plain(layers[0])]
                scales, fit = [1.0], 0.0
            else:
                replacements, scales, fit = _tie_group(bank, layers, vectors[members])
            for layer, new in zip(layers, replacements):
                for name in names[id(layer)]:
                    replace_module(model, name, new)
            result.groups.append(TieGroup(bank_name, [users[i][0] for i in members],
                                          float(similarity[members][:, members].min()), fit, scales))
        for _, layer in users:
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
