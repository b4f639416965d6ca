"""Optimizer parameter groups for soft-shared models."""

from __future__ import annotations

from torch import nn

from ..layers import SharedLayer


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: sharing coefficients without weight decay, everything else with it.

    Decaying the coefficients would shrink every layer's weight towards zero regardless of the
    templates, so the paper trains them without decay.
    """
    coefficient_ids = {id(m.coefficients) for m in model.modules() if isinstance(m, SharedLayer)}
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if id(param) in coefficient_ids else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
