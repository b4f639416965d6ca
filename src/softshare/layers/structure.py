"""Moving layers between plain and shared form, and describing which layers share which bank.

`share()`, `unshare()`, `tie()` and checkpoint loading all rewrite a model's layers in place;
these are their primitives. A model's *bank structure* (`describe_banks`) is a JSON list, one
entry per bank: ``{"num_templates": k, "weight_shape": [...], "layers": [qualified names]}``.
It is all a checkpoint needs to turn a freshly built plain model into the saved shared one
(`match_banks`), which is how foreign models (timm, transformers, your own) load.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import SoftshareError
from .bank import TemplateBank
from .conv1d import Conv1d
from .shared import SharedConv1d, SharedConv2d, SharedLayer, SharedLinear, SharedSubclass, named_banks, shared_subclass

PLAIN_TO_SHARED: dict[type, type] = {nn.Conv1d: SharedConv1d, Conv1d: SharedConv1d, nn.Conv2d: SharedConv2d,
                                     nn.Linear: SharedLinear}
SHARED_TO_PLAIN: dict[type, type] = {SharedConv1d: nn.Conv1d, SharedConv2d: nn.Conv2d, SharedLinear: nn.Linear}
PLAIN_BASES = (nn.Conv1d, nn.Conv2d, nn.Linear)  # their subclasses share through `SharedSubclass`


def to_shared(module: nn.Module, bank: TemplateBank) -> SharedLayer:
    """A shared layer drawing from `bank` with `module`'s hyperparameters and bias (not its weight)."""
    cls = PLAIN_TO_SHARED.get(type(module))
    if cls is None and not isinstance(module, PLAIN_BASES):
        raise SoftshareError(f"only nn.Conv1d, nn.Conv2d and nn.Linear can share a bank, got {type(module).__name__}")
    if tuple(module.weight.shape) != bank.weight_shape:
        raise SoftshareError(f"a {type(module).__name__} with weight {tuple(module.weight.shape)} cannot use a bank "
                             f"of {bank.weight_shape} templates")
    if cls is None:
        return _subclass_to_shared(module, bank)
    has_bias = module.bias is not None
    if cls is SharedLinear:
        layer = SharedLinear(bank, bias=has_bias)
    else:
        layer = cls(bank, stride=module.stride, padding=module.padding, dilation=module.dilation,
                    groups=module.groups, bias=has_bias, padding_mode=module.padding_mode)
        if getattr(module, "channels_last", False):  # a softshare Conv1d already in the faster layout
            layer.channels_last = True
    layer.to(module.weight.device, module.weight.dtype)
    if has_bias:
        with torch.no_grad():
            layer.bias.copy_(module.bias)
    return layer.train(module.training)


def to_plain(layer: SharedLayer) -> nn.Module:
    """The nn.Conv1d/Conv2d/Linear computing exactly what `layer` computes now (its mixed weight)."""
    if isinstance(layer, SharedSubclass):
        return _subclass_to_plain(layer)
    cls = SHARED_TO_PLAIN.get(type(layer))
    if cls is None:
        raise SoftshareError(f"{type(layer).__name__} has no plain counterpart")
    weight = layer.bank.mix(layer.coefficients).detach()
    has_bias = layer.bias is not None
    with torch.device("meta"):  # the weights are overwritten: skip their initialisation
        if cls is nn.Linear:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=has_bias)
        else:
            plain = cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                        padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=has_bias,
                        padding_mode=layer.padding_mode)
    requires_grad = layer.coefficients.requires_grad
    plain.weight = nn.Parameter(weight.clone(), requires_grad=requires_grad)  # keeps the memory format
    if has_bias:
        plain.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
    return plain.train(layer.training)


def _moved(module: nn.Module, cls: type) -> nn.Module:
    """A new `cls` instance holding `module`'s state (its own copies of the parameter, buffer and
    submodule tables, so editing them leaves `module` as it was)."""
    new = cls.__new__(cls)
    state = dict(module.__dict__)
    for table in ("_parameters", "_buffers", "_modules"):
        state[table] = dict(state[table])
    new.__dict__.update(state)
    return new


def _subclass_to_shared(module: nn.Module, bank: TemplateBank) -> SharedSubclass:
    """`module` (a Conv/Linear subclass) as an instance of its shared form: same class behaviour,
    hyperparameters, bias and extra parameters; its weight now drawn from `bank`."""
    weight = module.weight
    layer = _moved(module, shared_subclass(type(module)))
    del layer._parameters["weight"]
    layer.bank = bank
    factory = {"dtype": bank.templates.dtype, "device": bank.templates.device}
    layer.coefficients = nn.Parameter(torch.nn.functional.normalize(torch.randn(bank.num_templates, **factory), dim=0),
                                      requires_grad=weight.requires_grad)
    bank.attach(layer)
    return layer


def _subclass_to_plain(layer: SharedSubclass) -> nn.Module:
    weight = layer.bank.mix(layer.coefficients).detach()
    plain = _moved(layer, layer.plain_class)
    del plain._modules["bank"]
    requires_grad = plain._parameters.pop("coefficients").requires_grad
    plain._parameters = {"weight": nn.Parameter(weight.clone(), requires_grad=requires_grad), **plain._parameters}
    return plain


def count_parameters(model: nn.Module) -> int:
    """Parameters of `model`, a tensor shared by several layers counted once."""
    return sum(p.numel() for p in model.parameters())


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name of every submodule (a module used at several places has several)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at qualified `name` inside `model`."""
    if not name:
        raise SoftshareError("cannot replace a model by itself; wrap a single layer in nn.Sequential")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def describe_banks(model: nn.Module) -> list[dict[str, Any]]:
    """The model's bank structure (see the module docstring), banks in module order."""
    return [{"num_templates": bank.num_templates, "weight_shape": list(bank.weight_shape),
             "layers": [name for name, _ in users]} for _, bank, users in named_banks(model)]


def unshare_layers(model: nn.Module) -> int:
    """Replace every shared layer by its plain equivalent, in place; returns how many."""
    names = module_names(model)
    shared = [module for module in model.modules() if isinstance(module, SharedLayer)]
    for layer in shared:
        plain = to_plain(layer)
        for name in names[id(layer)]:
            replace_module(model, name, plain)
        layer.bank.detach(layer)
    drop_unused_banks(model)
    return len(shared)


def drop_unused_banks(model: nn.Module) -> None:
    """Remove banks no layer draws from any more (a model may also hold its banks itself, e.g.
    ``stage.bank``): their templates would still count as parameters and be saved.

    An attribute becomes None; an entry of a ModuleList/Sequential becomes nn.Identity, so the
    other entries keep their indices.
    """
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, TemplateBank) and not module.layers and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if isinstance(parent, (nn.ModuleList, nn.Sequential)):
                parent._modules[child] = nn.Identity()
            else:
                setattr(parent, child, None)


def apply_banks(model: nn.Module, structure: list[dict[str, Any]]) -> None:
    """Turn the plain layers named in `structure` into shared layers of new banks, in place.

    The new parameters are freshly initialised: this rebuilds an architecture for loading
    weights into, it does not approximate the plain layers' weights (that is `share`).
    """
    for entry in structure:
        try:
            k, shape, layers = int(entry["num_templates"]), tuple(entry["weight_shape"]), list(entry["layers"])
        except (KeyError, TypeError, ValueError):
            raise SoftshareError(f"invalid bank description {entry!r}; expected num_templates, weight_shape "
                                 f"and layers") from None
        names, modules = module_names(model), []
        for name in layers:
            try:
                modules.append(model.get_submodule(name))
            except AttributeError:
                raise SoftshareError(f"the model has no layer {name!r} to share a bank; build the same "
                                     f"architecture the checkpoint was saved from") from None
        reference = modules[0].weight
        bank = TemplateBank(k, shape).to(reference.device, reference.dtype)
        for module in modules:
            layer = to_shared(module, bank)
            for name in names[id(module)]:  # every place the plain layer is used
                replace_module(model, name, layer)


def match_banks(model: nn.Module, structure: list[dict[str, Any]]) -> None:
    """Rewrite `model` in place so its bank structure is `structure` (layers are unshared first
    where it differs). Only the architecture is matched: load the weights afterwards."""
    if describe_banks(model) == structure:
        return
    unshare_layers(model)
    apply_banks(model, structure)
