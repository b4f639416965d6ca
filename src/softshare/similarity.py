"""The Layer Similarity Matrix: which layers sharing a bank have become the same layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import named_banks


@dataclass
class LayerSimilarity:
    """S_ij = |<a_i, a_j>| / (|a_i| |a_j|) over the coefficient vectors of one bank's layers."""

    bank: str
    layers: list[str]
    matrix: torch.Tensor  # (n_layers, n_layers), float64

    def to_dict(self) -> dict:
        return {"bank": self.bank, "layers": self.layers, "matrix": self.matrix.tolist()}


def layer_similarity(model: nn.Module) -> list[LayerSimilarity]:
    """One LayerSimilarity per bank, layers in module (forward) order. A zero vector scores 0."""
    results = []
    for bank_name, _, users in named_banks(model):
        coefficients = torch.stack([layer.coefficients.detach().to("cpu", torch.float64) for _, layer in users])
        norms = coefficients.norm(dim=1, keepdim=True)
        unit = torch.where(norms > 0, coefficients / norms.clamp_min(1e-300), torch.zeros_like(coefficients))
        results.append(LayerSimilarity(bank_name, [name for name, _ in users], (unit @ unit.T).abs()))
    return results


def layer_role(name: str) -> str:
    """What a layer is within its repeated block: the name after the last numeric component.

    ``stages.0.blocks.3.conv1`` -> ``conv1``. Layers with the same role in consecutive blocks
    are the ones that folding merges into one looped layer.
    """
    parts = name.split(".")
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[numeric[-1] + 1:]) if numeric else name


def recurrence_penalty(model: nn.Module) -> torch.Tensor:
    """Differentiable pull towards recurrence: mean of 1 - cos^2 over foldable pairs.

    The pairs are layers of the same role in consecutive blocks of one bank (exactly what
    `fold` needs to collapse blocks into a loop), not all pairs: a block's conv1 and conv2 stay
    free to differ. cos^2 rather than |cos| keeps the gradient smooth, and like the LSM it
    ignores sign and scale (a fold keeps a per-iteration scale).
    """
    terms = []
    for _, _, users in named_banks(model):
        by_role: dict[str, list[torch.Tensor]] = {}
        for name, layer in users:
            by_role.setdefault(layer_role(name), []).append(layer.coefficients)
        for vectors in by_role.values():
            if len(vectors) > 1:
                unit = torch.nn.functional.normalize(torch.stack(vectors), dim=1)
                terms.append(1 - (unit[:-1] * unit[1:]).sum(1).pow(2))
    if not terms:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.cat(terms).mean()
