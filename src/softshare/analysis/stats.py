"""Parameter accounting for shared models: per bank, and against the unshared equivalent."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..layers import named_banks
from ..layers.structure import count_parameters


@dataclass
class BankStats:
    name: str
    num_layers: int
    num_templates: int
    weight_shape: tuple[int, ...]
    params: int  # templates + the layers' coefficients
    unshared_params: int  # one full weight per layer


@dataclass
class SharingStats:
    banks: list[BankStats]
    total: int
    unshared_total: int


def sharing_stats(model: nn.Module) -> SharingStats:
    """Parameter counts of `model` and of the same architecture with every shared layer unshared."""
    banks = []
    for name, bank, users in named_banks(model):
        numel = math.prod(bank.weight_shape)
        banks.append(BankStats(name, len(users), bank.num_templates, bank.weight_shape,
                               bank.templates.numel() + sum(layer.coefficients.numel() for _, layer in users),
                               numel * len(users)))
    total = count_parameters(model)
    unshared = total - sum(b.params for b in banks) + sum(b.unshared_params for b in banks)
    return SharingStats(banks, total, unshared)
