"""Convert an existing PyTorch model to soft parameter sharing."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import nn

from ..errors import SoftshareError
from ..layers import Conv1d, SharedConv1d, SharedConv2d, SharedLinear, TemplateBank, init_coefficients

Selector = str | Sequence[str] | Callable[[str, nn.Module], bool] | None
_CONVERSIONS: dict[type, type] = {nn.Conv2d: SharedConv2d, nn.Conv1d: SharedConv1d, Conv1d: SharedConv1d,
                                   nn.Linear: SharedLinear}


def _selected(select: Selector, name: str, module: nn.Module) -> bool:
    if select is None:
        return isinstance(module, (nn.Conv1d, nn.Conv2d))
    if callable(select):
        return bool(select(name, module))
    patterns = [select] if isinstance(select, str) else list(select)
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def share(
    model: nn.Module,
    num_templates: int,
    select: Selector = None,
    group: Callable[[str, nn.Module], Hashable] | None = None,
    init_from_weights: bool = False,
) -> nn.Module:
    """Replace selected Conv1d/Conv2d/Linear layers of `model` by soft-shared ones, in place.

    Args:
        model: any model; only the selected layers change.
        num_templates: k, the templates in each bank.
        select: which layers to share: None (every Conv1d/Conv2d), glob pattern(s) on the
            qualified module name (``"layer*.conv*"``), or a predicate ``(name, module) -> bool``.
        group: optional ``(name, module) -> key``; layers share a bank only when their weight
            shape *and* key match. By default one bank per weight shape.
        init_from_weights: start from the existing weights. With k >= group size every layer
            gets its own weight as a template (outputs unchanged); with fewer templates the
            bank is the best rank-k approximation of the group's weights (truncated SVD).

    Returns:
        The same model object, converted. Coefficients of every new bank are orthogonally
        initialised unless `init_from_weights` is set.
    """
    if int(num_templates) < 1:
        raise SoftshareError(f"num_templates must be >= 1, got {num_templates}")
    names: dict[int, list[str]] = {}  # a module used at several places is converted once
    candidates: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) in _CONVERSIONS and _selected(select, name, module):
            if id(module) not in names:
                candidates.append((name, module))
            names.setdefault(id(module), []).append(name)
    if not candidates:
        raise SoftshareError(
            "share() selected no Conv1d/Conv2d/Linear layer; check the `select` pattern against "
            "the names in model.named_modules()"
        )
    if "" in names.get(id(model), ()):
        raise SoftshareError("share() replaces layers inside a model, not the model itself; "
                             "wrap a single layer in nn.Sequential")
    groups: dict[Hashable, list[tuple[str, nn.Module]]] = {}
    for name, module in candidates:
        key = (type(module), tuple(module.weight.shape), group(name, module) if group else None)
        groups.setdefault(key, []).append((name, module))

    for members in groups.values():
        reference = members[0][1].weight
        bank = TemplateBank(num_templates, reference.shape).to(reference.device, reference.dtype)
        shared = [_convert(module, bank) for _, module in members]
        if init_from_weights:
            _fit_bank(bank, shared, [module.weight.detach() for _, module in members])
        else:
            init_coefficients(shared)
        for (_, module), layer in zip(members, shared):
            for name in names[id(module)]:
                _set_submodule(model, name, layer)
    return model


def _convert(module: nn.Module, bank: TemplateBank) -> nn.Module:
    cls = _CONVERSIONS[type(module)]
    has_bias = module.bias is not None
    if cls is SharedLinear:
        layer = SharedLinear(bank, bias=has_bias)
    else:
        layer = cls(bank, stride=module.stride, padding=module.padding, dilation=module.dilation,
                    groups=module.groups, bias=has_bias, padding_mode=module.padding_mode)
        if getattr(module, "channels_last", False):
            layer.channels_last = True
    layer.to(module.weight.device, module.weight.dtype)
    if has_bias:
        with torch.no_grad():
            layer.bias.copy_(module.bias)
    return layer


def _fit_bank(bank: TemplateBank, layers: list[nn.Module], weights: list[torch.Tensor]) -> None:
    n, k = len(weights), bank.num_templates
    flat = torch.stack([w.reshape(-1) for w in weights]).to(torch.float64)
    with torch.no_grad():
        if k >= n:
            coefficients = torch.eye(n, k, dtype=torch.float64)
            bank.templates[:n].copy_(flat.view(n, *bank.weight_shape))
        else:  # truncated SVD: the best rank-k approximation of the stacked weights
            u, s, vh = torch.linalg.svd(flat, full_matrices=False)
            r = min(k, s.numel())
            coefficients = torch.zeros(n, k, dtype=torch.float64)
            coefficients[:, :r] = u[:, :r] * s[:r]
            bank.templates[:r].copy_(vh[:r].reshape(r, *bank.weight_shape))
        for layer, row in zip(layers, coefficients):
            layer.coefficients.copy_(row)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
