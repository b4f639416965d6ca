"""Convert an existing PyTorch model to soft parameter sharing, and back (`unshare`).

Selection rule: layers of one type and weight shape (and `group_by` key) form a group; a group of
n layers with weights of D numbers becomes one bank only when that removes parameters,
``k*D + n*k < n*D`` (k templates plus one coefficient per layer and template, against the n
weights): at least k+1 layers of one shape. So `share()` never makes a model bigger unless
asked (`allow_growth=True`), and `share(..., dry_run=True)` says what it would do.

Subclasses of nn.Conv1d/Conv2d/Linear (timm's StdConv2d, Conv2dSame, Linear; quantisation-aware
layers) keep their own forward, reading the mixed weight as ``self.weight``: a weight transform in
their forward (standardisation, 'same' padding) then applies to the mixed weight. A subclass that
overrides `forward` is checked on a small input first: its output must be computed from
``self.weight`` (the same with the weight drawn from a bank, different with another weight).
Every layer not converted is named in the plan with the reason.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import operator
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import SoftshareError
from ..layers import SharedLayer, TemplateBank, init_coefficients
from ..layers.structure import (PLAIN_BASES, PLAIN_TO_SHARED, count_parameters, module_names, replace_module, to_shared,
                                unshare_layers)

Selector = str | Sequence[str] | Callable[[str, nn.Module], bool] | None
GroupBy = str | Callable[[str, nn.Module], Hashable]
GROUP_BY = ("shape", "stage", "parent")


def _selected(select: Selector, name: str, module: nn.Module) -> bool:
    if select is None:
        return isinstance(module, (nn.Conv1d, nn.Conv2d))
    if callable(select):
        return bool(select(name, module))
    patterns = [select] if isinstance(select, str) else list(select)
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _weight_layer(module: nn.Module) -> bool:
    """A plain layer with a weight matrix or kernel (what a user may expect `share` to consider)."""
    if isinstance(module, SharedLayer):
        return False
    weight = module._parameters.get("weight")
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or (weight is not None and weight.dim() >= 2)


@dataclass
class SkippedLayer:
    """A layer with a weight that `share` leaves alone, and why."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    reason: str


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
    skipped: list[SkippedLayer] = field(default_factory=list)  # layers with weights not in any group

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
        by_reason: dict[tuple[str, str], list[str]] = {}
        for layer in self.skipped:
            by_reason.setdefault((layer.kind, layer.reason), []).append(layer.name)
        for (kind, reason), names in by_reason.items():
            shown = ", ".join(names[:4]) + (f", ... ({len(names)} layers)" if len(names) > 4 else "")
            lines.append(f"  not converted  {kind} x{len(names)}: {reason}  [{shown}]")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def share(
    model: nn.Module,
    num_templates: int,
    select: Selector = None,
    group_by: GroupBy = "shape",
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
        group_by: which layers of one type and weight shape draw from one bank:
            ``"shape"`` (default) all of them, wherever they are in the model;
            ``"stage"`` those of one stage (the paper's choice: one bank per stage of a WRN),
            where a layer's stage is its innermost ancestor holding two or more blocks of one
            class (a block: a submodule with at least two conv/linear layers), e.g. ``layer2``
            of a torchvision ResNet, ``stages.1.blocks`` of an SWRN, ``blocks.3`` of timm's
            EfficientNet/MobileNetV3, ``encoder.stages.2.layers`` of a Hugging Face ResNet;
            ``"parent"`` those with the same parent module (one bank per block);
            or a function ``(name, module) -> key``: one bank per weight shape and key (e.g.
            ``lambda name, m: "se." in name`` keeps squeeze-excite convs apart).
        init_from_weights: start from the existing weights: the bank is the best rank-k
            approximation of the group's weights (truncated SVD; exact when k >= group size).
        allow_growth: also convert groups where a bank has as many parameters as the layers
            or more (fewer than k+1 layers); off by default, so the model never grows.
        dry_run: change nothing and return the `SharePlan` instead.

    Returns:
        The same model object, converted (its plan in ``model.softshare_share_plan``), or the
        plan when `dry_run`. Coefficients of every new bank are orthogonally initialised
        unless `init_from_weights` is set. The plan names every layer with a weight that was
        not converted, and why (``plan.skipped``, groups with ``shared=False``).
    """
    plan, members = _plan(model, num_templates, select, group_by, allow_growth)
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
    if not plan.groups:
        return "no layer could be converted"
    biggest = max(plan.groups, key=lambda g: len(g.layers))
    return f"the largest group has {len(biggest.layers)}, {biggest.kind}{list(biggest.weight_shape)}"


def _plan(model: nn.Module, k: int, select: Selector, group_by: GroupBy, allow_growth: bool
          ) -> tuple[SharePlan, list[list[nn.Module]]]:
    """The plan and, per planned group, its modules (a module used at several places once)."""
    try:
        k = operator.index(k)
    except TypeError:
        k = 0
    if isinstance(k, bool) or k < 1:
        raise SoftshareError(f"num_templates must be an integer >= 1, got {k!r}")
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        raise SoftshareError(f"{type(model).__name__} has lazy layers whose weights are not created yet; run one "
                             f"forward pass with a dummy batch first, then share it")
    key_of = _group_key(model, group_by)
    seen: set[int] = set()
    groups: dict[Hashable, list[tuple[str, nn.Module]]] = {}
    skipped: list[SkippedLayer] = []
    problems: dict[type, str] = {}  # subclasses that do not override forward: checked once per class
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen or not _weight_layer(module):
            continue
        seen.add(id(module))
        weight = module._parameters.get("weight")
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else ()
        if not _selected(select, name, module):
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                skipped.append(SkippedLayer(name, type(module).__name__, shape, "not selected (the default "
                                            "selects every Conv1d/Conv2d; `select` takes names or a predicate)"))
            continue
        if module is model:
            raise SoftshareError("share() replaces layers inside a model, not the model itself; "
                                 "wrap a single layer in nn.Sequential")
        problem = _problem(module, problems)
        if problem:
            skipped.append(SkippedLayer(name, type(module).__name__, shape, problem))
            continue
        key = (type(module), shape, key_of(name, module))
        groups.setdefault(key, []).append((name, module))
    if not groups:
        reasons = "; ".join(sorted({f"{s.kind}: {s.reason}" for s in skipped if not s.reason.startswith("not sel")}))
        raise SoftshareError(
            "share() selected no Conv1d/Conv2d/Linear layer it can convert"
            + (f" ({reasons})" if reasons else "; check the `select` pattern against the names in "
               "model.named_modules()"))
    plan = SharePlan(k, params_before=count_parameters(model), skipped=skipped)
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


# -- which layers can draw from a bank ---------------------------------------------------------------
def _problem(module: nn.Module, known: dict[type, str]) -> str:
    """Why `module` cannot draw its weight from a bank ('' when it can)."""
    cls = type(module)
    if cls in PLAIN_TO_SHARED:
        return ""
    base = next((b for b in PLAIN_BASES if isinstance(module, b)), None)
    if base is None:
        return "softshare shares the weights of Conv1d, Conv2d and Linear layers (and their subclasses) only"
    if parametrize.is_parametrized(module):
        return "its weight has a parametrization (torch.nn.utils.parametrize); remove it first"
    if not isinstance(module._parameters.get("weight"), nn.Parameter):
        return "its weight is not a parameter (weight_norm or a hook computes it)"
    same_forward = cls.forward is base.forward and getattr(cls, "_conv_forward", None) is getattr(base, "_conv_forward",
                                                                                                    None)
    if same_forward:
        return ""
    if cls not in known or known[cls]:  # an instance that passes clears the class; a failure is re-checked
        known[cls] = _check_forward(module)
    return known[cls]


def _check_forward(module: nn.Module) -> str:
    """Run a copy of `module` (float64, CPU) on a small input with its own weight, then with that
    weight drawn from a one-template bank, then with another weight: the subclass computes from
    ``self.weight`` when the first two agree and the third differs. '' or the reason it does not."""
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            probe = copy.deepcopy(module)
            if any(t.is_meta for t in [*probe.parameters(), *probe.buffers()]):
                probe = probe.to_empty(device="cpu")
                for tensor in [*probe.parameters(), *probe.buffers()]:
                    if tensor.is_floating_point():
                        tensor.copy_(torch.randn(tensor.shape, generator=generator))
            probe = probe.to("cpu", torch.float64).eval()
            x = torch.randn(_probe_shape(probe), generator=generator, dtype=torch.float64)
            expected = probe(x)
            bank = TemplateBank(1, probe.weight.shape).double()
            bank.templates.copy_(probe.weight[None])
            shared = to_shared(probe, bank).eval()
            shared.coefficients.fill_(1.0)
            same = shared(x)
            bank.templates.copy_(torch.randn(bank.templates.shape, generator=generator, dtype=torch.float64))
            other = shared(x)
    except Exception as err:  # noqa: BLE001 - any failure of foreign code is a reason to refuse, not a crash
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"its forward could not be checked on a small input ({type(err).__name__}: {detail[:120]})"
    if not (isinstance(expected, torch.Tensor) and isinstance(same, torch.Tensor)
            and torch.allclose(expected, same, rtol=1e-9, atol=1e-12)):
        return "its forward does not compute its output from `self.weight` alone (the output changes when " \
               "that weight comes from a bank)"
    if torch.allclose(same, other, rtol=1e-9, atol=1e-12):
        return "its output does not depend on `self.weight`"
    return ""


def _probe_shape(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, nn.Linear):
        return (2, module.in_features)
    size = [d * (k - 1) + 1 + 2 * s for k, s, d in zip(module.kernel_size, module.stride, module.dilation)]
    return (2, module.in_channels, *size)


# -- which layers of one shape share a bank ------------------------------------------------------------
def _group_key(model: nn.Module, group_by: GroupBy) -> Callable[[str, nn.Module], Hashable]:
    if callable(group_by):
        return group_by
    if group_by == "shape":
        return lambda name, module: None
    if group_by == "parent":
        return lambda name, module: name.rpartition(".")[0]
    if group_by == "stage":
        stages = _stage_containers(model)
        return lambda name, module: _stage_of(name, stages)
    raise SoftshareError(f"group_by must be one of {', '.join(GROUP_BY)} or a function (name, module) -> key, "
                         f"got {group_by!r}")


def _stage_containers(model: nn.Module) -> set[str]:
    """Names of the modules holding two or more blocks of one class (a block: a submodule with at
    least two conv/linear layers): where a network repeats its blocks, i.e. its stages."""
    layers: dict[int, int] = {}

    def count(module: nn.Module) -> int:
        if id(module) not in layers:
            own = 1 if isinstance(module, (*PLAIN_BASES, SharedLayer)) else 0
            layers[id(module)] = own + sum(count(child) for child in module.children())
        return layers[id(module)]

    containers = set()
    for name, module in model.named_modules():
        blocks = Counter(type(child) for child in module.children() if count(child) >= 2)
        if blocks and max(blocks.values()) >= 2:
            containers.add(name)
    return containers


def _stage_of(name: str, stages: set[str]) -> str:
    """The innermost stage container above the layer `name` ('' for the model itself, or none)."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:depth])
        if prefix in stages:
            return prefix
    return ""


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
