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
