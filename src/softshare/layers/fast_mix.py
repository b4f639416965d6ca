"""The fast path behind `TemplateBank.weight_for`: a bank's weights all at once, buffers reused.

Why it exists: mixing each layer on its own costs a small GEMM per layer forward and two
backward, and on CPU every fresh bank-sized tensor is page-faulted in on every step (tens of ms
for WRN-28-10). Here a bank materialises *all* its layers' weights at once, ``W = A @ T`` (A
stacks the layers' coefficient vectors), and hands each layer its slice: one GEMM forward and
two backward per bank and step, whatever the number of layers. The result lives for one
forward pass (each layer takes its weight once) and is dropped as soon as backward runs
through it or any parameter changes in place (optimizer step, load). On CPU the bank-wide
buffers (weights, stacked gradients, the templates' gradient) are kept and reused whenever
nothing else refers to them any more; ``eval()`` and device/dtype moves release them.

The values are exactly `TemplateBank.mix` of each layer's coefficients. Private torch APIs are
used, each guarded so that losing one only turns part of the fast path off: the storage use
count (``torch._C._storage_Use_Count``: may a buffer be reused?), the functorch interpreter
stack and ``forward_ad._current_level`` (under torch.func or forward-mode AD the plain `mix` is
used), and tensor ``_version`` counters (did a parameter change in place?).
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor, nn


class BankMixer:
    """One bank's fast-path state: the weights of the current forward pass and reusable buffers.

    A copy or pickle of a bank gets a fresh, empty mixer (the weights are non-leaf tensors).
    """

    def __init__(self) -> None:
        self._cache: _Cache | None = None
        self._scratch: dict[str, Tensor] = {}

    def __reduce__(self):
        return (BankMixer, ())

    def invalidate(self) -> None:
        self._cache = None
        self._scratch = {}

    def release_buffers(self) -> None:
        self._scratch = {}

    def weight_for(self, bank: nn.Module, layer: nn.Module) -> Tensor:
        """The mixed weight of `layer` of `bank`, from the bank-wide materialisation.

        Each materialisation hands every layer its weight once: the first layer asking again
        (the next forward pass) triggers a new one. So the weights are always as fresh as a
        forward pass, even after changes the cache cannot see (``param.data`` edits).
        """
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or _functional_transform_active():
            return bank.mix(layer.coefficients)  # exporters and transforms see plain ops, no cache
        key = _cache_key(bank)
        cache = self._cache
        if cache is None or cache.key != key or id(layer) not in cache.weights:
            if all(existing is not layer for existing in bank.layers):
                return bank.mix(layer.coefficients)
            cache = self._materialise(bank, key)
        return cache.weights.pop(id(layer))

    def _materialise(self, bank: nn.Module, key: tuple) -> _Cache:
        self._cache = None  # release the previous weights first, so their buffer can be reused
        layers = bank.layers
        coefficients = [layer.coefficients for layer in layers]
        token = next(_TOKENS)
        params = [bank.templates, *coefficients]
        # The custom backward pays off in training only; in eval mode plain ops keep the graph
        # exportable (jit.trace, ONNX) even with gradients on.
        if bank.training and torch.is_grad_enabled() and any(p.requires_grad for p in params):
            weights = _MixAll.apply(weakref.ref(self), token, bank.templates, *coefficients)
        else:
            weights = bank.mix(torch.stack(coefficients)).unbind(0)
        self._cache = _Cache(key, token, {id(layer): w for layer, w in zip(layers, weights)})
        return self._cache

    def buffer(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised (shape) tensor like `like`; on CPU the same memory as last time when
        nothing but the mixer refers to it any more (no page faults for bank-sized tensors)."""
        if like.device.type != "cpu" or like.is_inference():
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        buffer = self._scratch.get(name)
        if (buffer is None or buffer.shape != shape or buffer.dtype != like.dtype
                or buffer.is_inference() or not _sole_reference(buffer)):
            buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
            self._scratch[name] = buffer
        return buffer


def _cache_key(bank: nn.Module) -> tuple:
    params = [bank.templates] + [layer.coefficients for layer in bank.layers]
    device = bank.templates.device.type
    if device == "meta":  # shapes only (the trainer's memory estimate): no autocast on meta
        autocast = False
    else:
        autocast = torch.is_autocast_enabled(device) if _HAS_DEVICE_AUTOCAST else torch.is_autocast_enabled()
    return (
        torch.is_grad_enabled(),
        autocast,
        tuple((p.data_ptr(), p._version, p.requires_grad, p.dtype, p.device) for p in params),
    )


class _Cache:
    __slots__ = ("key", "token", "weights")

    def __init__(self, key: tuple, token: int, weights: dict[int, Tensor]) -> None:
        self.key, self.token, self.weights = key, token, weights


_TOKENS = itertools.count()
_HAS_DEVICE_AUTOCAST = True
try:
    torch.is_autocast_enabled("cpu")
except TypeError:  # pragma: no cover - torch < 2.4
    _HAS_DEVICE_AUTOCAST = False


def flat_layout(templates: Tensor) -> tuple[Tensor, tuple[int, ...], list[int]]:
    """A (k, D) view of `templates` in memory order, the per-template shape in that order, and
    the permutation taking that order back to the logical (out, in, ...) one."""
    perm = sorted(range(1, templates.dim()), key=lambda d: -templates.stride(d))
    ordered = templates.permute(0, *perm)
    if not ordered.is_contiguous():
        perm, ordered = list(range(1, templates.dim())), templates.contiguous()
    ordered_shape = tuple(templates.shape[d] for d in perm)
    inverse = [perm.index(d) for d in range(1, templates.dim())]
    return ordered.reshape(templates.shape[0], -1), ordered_shape, inverse


def _storage_use_count(tensor: Tensor) -> int:
    storage = tensor.untyped_storage()  # keep the Python storage alive while counting
    return torch._C._storage_Use_Count(storage._cdata)


def _sole_reference(tensor: Tensor) -> bool:
    """True when no tensor but `tensor` itself uses its storage (no live view, graph or .grad)."""
    try:
        return _storage_use_count(tensor) <= _BASE_USE_COUNT
    except (AttributeError, RuntimeError):  # pragma: no cover - private API gone: never reuse
        return False


try:
    _BASE_USE_COUNT = _storage_use_count(torch.empty(1))
except (AttributeError, RuntimeError):  # pragma: no cover
    _BASE_USE_COUNT = 0


def _functional_transform_active() -> bool:
    """torch.func transforms and forward-mode AD need plain differentiable ops."""
    try:
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return True
    except AttributeError:  # pragma: no cover
        pass
    return torch.autograd.forward_ad._current_level >= 0


class _MixAll(torch.autograd.Function):
    """All weights of a bank, ``W = A @ T``, returned as one view per layer.

    Backward computes ``dT = A^T G`` and ``dA = G T^T`` (G: the layers' weight gradients in the
    templates' memory order) chunk by chunk, reading each gradient once. Nothing is freed by backward, so
    two losses sharing one materialisation can be backpropagated one after the other, like
    with ordinary weights; in-place changes of the parameters in between are detected.
    """

    @staticmethod
    def forward(ctx, mixer_ref, token, templates, *coefficients):
        ctx.set_materialize_grads(False)
        flat, ordered_shape, inverse = flat_layout(templates)
        stacked = torch.stack(coefficients).to(flat.dtype)
        mixer = mixer_ref()
        n = stacked.shape[0]
        out = mixer.buffer("weights", (n, flat.shape[1]), flat) if mixer is not None else None
        weights = torch.mm(stacked, flat, out=out) if out is not None else torch.mm(stacked, flat)
        ctx.mixer_ref, ctx.token = mixer_ref, token
        ctx.templates, ctx.coefficients, ctx.stacked = templates, coefficients, stacked
        ctx.versions = tuple(p._version for p in (templates, *coefficients))
        permute = (0, *(1 + i for i in inverse))
        return tuple(weights.view(n, *ordered_shape).permute(*permute).unbind(0))

    @staticmethod
    def backward(ctx, *grads):
        mixer = ctx.mixer_ref()
        if mixer is not None and mixer._cache is not None and mixer._cache.token == ctx.token:
            mixer._cache = None  # backward ran through these weights: the next forward re-mixes
        templates, coefficients = ctx.templates, ctx.coefficients
        if tuple(p._version for p in (templates, *coefficients)) != ctx.versions:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                "operation: a template bank's templates or coefficients changed between forward and "
                "backward (e.g. optimizer.step() before loss.backward())"
            )
        rows = [i for i, g in enumerate(grads) if g is not None]
        results: list[Tensor | None] = [None] * len(coefficients)
        if not rows:
            return (None, None, None, *results)
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops, no reused buffers
            grad_templates, grad_rows = _mix_backward_differentiable(templates, coefficients, grads, rows)
        else:
            grad_templates, grad_rows = _mix_backward(ctx, mixer, grads, rows)
        for i, grad in zip(rows, grad_rows if grad_rows is not None else ()):
            if ctx.needs_input_grad[3 + i]:
                results[i] = grad.to(coefficients[i].dtype, copy=True)  # not views of one tensor
        return (None, None, grad_templates if ctx.needs_input_grad[2] else None, *results)


_CHUNK = 1 << 16  # elements per template row handled at once by the backward pass


def _mix_backward(ctx, mixer, grads, rows):
    """dT = A^T G and dA = G T^T without stacking the layers' gradients G in memory.

    The GEMMs run over column chunks of the flat templates: each chunk of every layer's
    gradient is copied into a small (cache-resident) buffer that both products then read, so
    each gradient is read from memory once instead of three times (copy, dT, dA).
    """
    templates = ctx.templates
    flat, ordered_shape, inverse = flat_layout(templates)
    k, size = flat.shape
    forward_perm = _forward_perm(inverse)
    layer_grads = []
    for i in rows:  # each layer's gradient as a flat row in the templates' memory order
        grad = grads[i].permute(*forward_perm)
        layer_grads.append((grad if grad.is_contiguous() else grad.contiguous()).view(-1))
    a = ctx.stacked if len(rows) == len(ctx.stacked) else ctx.stacked[rows]
    a_t = a.t()
    need_templates, need_rows = ctx.needs_input_grad[2], any(ctx.needs_input_grad[3:])
    grad_flat = grad_rows = None
    if need_templates:
        grad_flat = mixer.buffer("template_grad", (k, size), flat) if mixer is not None else flat.new_empty(k, size)
    if need_rows:
        grad_rows = flat.new_zeros(len(rows), k)
    chunk = min(size, _CHUNK)
    staging = mixer.buffer("grads", (len(rows), chunk), flat) if mixer is not None else flat.new_empty(len(rows), chunk)
    for start in range(0, size, chunk):
        stop = min(size, start + chunk)
        block = torch.stack([grad[start:stop] for grad in layer_grads], out=staging[:, : stop - start])
        if need_templates:
            torch.mm(a_t, block, out=grad_flat[:, start:stop])
        if need_rows:
            grad_rows.addmm_(block, flat[:, start:stop].t())
    grad_templates = None
    if need_templates:
        grad_templates = grad_flat.view(k, *ordered_shape).permute(0, *(1 + i for i in inverse))
    return grad_templates, (grad_rows.unbind(0) if need_rows else None)


def _mix_backward_differentiable(templates, coefficients, grads, rows):
    flat, ordered_shape, inverse = flat_layout(templates)
    forward_perm = _forward_perm(inverse)
    stacked_grads = torch.stack([grads[i].permute(*forward_perm).reshape(-1) for i in rows])
    a = torch.stack([coefficients[i] for i in rows]).to(flat.dtype)
    grad_flat = a.t() @ stacked_grads
    grad_templates = grad_flat.view(flat.shape[0], *ordered_shape).permute(0, *(1 + i for i in inverse))
    return grad_templates, (stacked_grads @ flat.t()).unbind(0)


def _forward_perm(inverse: list[int]) -> list[int]:
    """The permutation from a layer's logical weight dims to the templates' memory order."""
    return [inverse.index(d) for d in range(len(inverse))]
