"""Convert an existing PyTorch model to soft parameter sharing, and back (`unshare`).

Selection rule: layers of one type and weight shape (and `group` key) form a group; a group of
n layers with weights of D numbers becomes one bank only when that removes parameters,
``k*D + n*k < n*D`` (k templates plus one coefficient per layer and template, against the n
weights): at least k+1 layers of one shape. So `share()` never makes a model bigger unless
asked (`allow_growth=True`), and `share(..., dry_run=True)` says what it would do.
"""

from __future__ import annotations

import fnmatch
import math
import operator
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import SoftshareError
from ..layers import TemplateBank, init_coefficients
from ..layers.structure import PLAIN_TO_SHARED, count_parameters, module_names, replace_module, to_shared, unshare_layers

Selector = str | Sequence[str] | Callable[[str, nn.Module], bool] | None


def _selected(select: Selector, name: str, module: nn.Module) -> bool:
    if select is None:
        return isinstance(module, (nn.Conv1d, nn.Conv2d))
    if callable(select):
        return bool(select(name, module))
    patterns = [select] if isinstance(select, str) else list(select)
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


@dataclass
class ShareGroup:
    """Layers of one type and weight shape: one bank if `shared`, else left as they are."""

    kind: str  # "Conv2d", "Linear", ...
    weight_shape: tuple[int, ...]
    layers: list[str]  # qualified names, module order
    num_templates: int
    shared: bool
    params_before: int  # the group's weights (biases do not change)
    params_after: int  # its bank and coefficients if shared, else params_before
    reason: str = ""  # why a group is not shared

    @property
    def saved(self) -> int:
        return self.params_before - self.params_after


@dataclass
class SharePlan:
    """What `share()` does (did) to a model: its groups and the parameters before and after."""

    num_templates: int
    groups: list[ShareGroup] = field(default_factory=list)
    params_before: int = 0  # the whole model
    params_after: int = 0

    @property
    def shared_groups(self) -> list[ShareGroup]:
        return [g for g in self.groups if g.shared]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """A few lines for people: the total, then one line per group (shared groups first)."""
        change = self.params_after / self.params_before - 1 if self.params_before else 0.0
        lines = [f"share(k={self.num_templates}): {len(self.shared_groups)} of {len(self.groups)} groups of "
                 f"same-shape layers shared; parameters {self.params_before:,} -> {self.params_after:,} "
                 f"({change:+.1%})"]
        for g in sorted(self.groups, key=lambda g: (not g.shared, -g.saved)):
            layers = ", ".join(g.layers[:4]) + (f", ... ({len(g.layers)} layers)" if len(g.layers) > 4 else "")
            what = f"{g.params_before:,} -> {g.params_after:,}" if g.shared else g.reason
            lines.append(f"  {'shared' if g.shared else 'kept  '}  {g.kind}{list(g.weight_shape)} x{len(g.layers)}: "
                         f"{what}  [{layers}]")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def share(
    model: nn.Module,
    num_templates: int,
    select: Selector = None,
    group: Callable[[str, nn.Module], Hashable] | None = None,
    init_from_weights: bool = False,
    *,
    allow_growth: bool = False,
    dry_run: bool = False,
) -> nn.Module | SharePlan:
    """Replace groups of same-shape Conv1d/Conv2d/Linear layers of `model` by soft-shared ones, in place.

    Args:
        model: any model; only the selected layers change.
        num_templates: k, the templates in each bank.
        select: which layers to consider: None (every Conv1d/Conv2d), glob pattern(s) on the
            qualified module name (``"layer*.conv*"``), or a predicate ``(name, module) -> bool``.
        group: optional ``(name, module) -> key``; layers share a bank only when their weight
            shape *and* key match. By default one bank per layer type and weight shape.
        init_from_weights: start from the existing weights: the bank is the best rank-k
            approximation of the group's weights (truncated SVD; exact when k >= group size).
        allow_growth: also convert groups where a bank has as many parameters as the layers
            or more (fewer than k+1 layers); off by default, so the model never grows.
        dry_run: change nothing and return the `SharePlan` instead.

    Returns:
        The same model object, converted (its plan in ``model.softshare_share_plan``), or the
        plan when `dry_run`. Coefficients of every new bank are orthogonally initialised
        unless `init_from_weights` is set.
    """
    plan, members = _plan(model, num_templates, select, group, allow_growth)
    if dry_run:
        return plan
    if not plan.shared_groups:
        raise SoftshareError(
            f"share() found no group of same-shape layers that sharing with k={num_templates} makes smaller "
            f"(a bank needs at least k+1 layers of one shape: {_largest(plan)}); lower num_templates, "
            f"widen `select`, or pass allow_growth=True to share anyway")
    names = module_names(model)
    for group_plan, group_members in zip(plan.groups, members):
        if group_plan.shared:
            _convert_group(model, names, group_members, num_templates, init_from_weights)
    model.softshare_share_plan = plan
    return model


def unshare(model: nn.Module) -> nn.Module:
    """Replace every shared layer by a plain nn.Conv1d/Conv2d/Linear holding its current mixed
    weight, in place: same outputs, no template banks left (so `torch.jit.script`, ONNX and
    libraries that refuse tied tensors, e.g. Hugging Face ``save_pretrained``, accept it).

    Folded loops (`fold_model`) already hold plain layers and are left as they are.
    """
    unshare_layers(model)
    return model


def _largest(plan: SharePlan) -> str:
    biggest = max(plan.groups, key=lambda g: len(g.layers))
    return f"the largest group has {len(biggest.layers)}, {biggest.kind}{list(biggest.weight_shape)}"


def _plan(model: nn.Module, k: int, select: Selector, group, allow_growth: bool
          ) -> tuple[SharePlan, list[list[nn.Module]]]:
    """The plan and, per planned group, its modules (a module used at several places once)."""
    try:
        k = operator.index(k)
    except TypeError:
        k = 0
    if isinstance(k, bool) or k < 1:
        raise SoftshareError(f"num_templates must be an integer >= 1, got {k!r}")
    seen: set[int] = set()
    groups: dict[Hashable, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) not in PLAIN_TO_SHARED or id(module) in seen or not _selected(select, name, module):
            continue
        if module is model:
            raise SoftshareError("share() replaces layers inside a model, not the model itself; "
                                 "wrap a single layer in nn.Sequential")
        seen.add(id(module))
        key = (type(module), tuple(module.weight.shape), group(name, module) if group else None)
        groups.setdefault(key, []).append((name, module))
    if not groups:
        raise SoftshareError(
            "share() selected no Conv1d/Conv2d/Linear layer; check the `select` pattern against "
            "the names in model.named_modules()")
    plan = SharePlan(k, params_before=count_parameters(model))
    saved = 0
    for (cls, shape, _), members in groups.items():
        n, size = len(members), math.prod(shape)
        before, after = n * size, k * size + n * k
        if after < before or allow_growth:
            plan.groups.append(ShareGroup(cls.__name__, shape, [nm for nm, _ in members], k, True, before, after))
            saved += before - after
        else:
            reason = "1 layer" if n == 1 else f"{n} layers, a bank of k={k} would not be smaller"
            plan.groups.append(ShareGroup(cls.__name__, shape, [nm for nm, _ in members], k, False, before, before,
                                          reason))
    plan.params_after = plan.params_before - saved
    return plan, [[module for _, module in members] for members in groups.values()]


def _convert_group(model: nn.Module, names: dict[int, list[str]], modules: list[nn.Module], k: int,
                   init_from_weights: bool) -> None:
    reference = modules[0].weight
    bank = TemplateBank(k, reference.shape).to(reference.device, reference.dtype)
    shared = [to_shared(module, bank) for module in modules]
    if init_from_weights:
        _fit_bank(bank, shared, [module.weight.detach() for module in modules])
    else:
        init_coefficients(shared)
    for module, layer in zip(modules, shared):
        for name in names[id(module)]:
            replace_module(model, name, layer)


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
