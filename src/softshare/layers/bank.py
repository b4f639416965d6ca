"""Template banks: the shared parameters that soft-shared layers mix their weights from."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..errors import SoftshareError

if TYPE_CHECKING:
    from .shared import SharedLayer


class TemplateBank(nn.Module):
    """k weight templates of one shape, held as a single parameter of shape (k, *weight_shape).

    A layer using the bank builds its weight as ``sum_j alpha_j * T_j``. The bank materialises
    *all* its layers' weights at once, ``W = A @ T`` (A stacks the layers' coefficient vectors),
    and hands each layer its slice: one GEMM forward and two backward per bank and training
    step, whatever the number of layers. The result lives for one forward pass (each layer takes
    its weight once) and is dropped as soon as backward runs through it or any parameter changes
    in place (optimizer step, load).

    Training on CPU: the bank-wide buffers (weights, their stacked gradients, the templates'
    gradient) are far larger than any single layer's weight, and a fresh allocation of that size
    is page-faulted in on every step (tens of ms for WRN-28-10). The bank therefore keeps them
    and reuses one whenever nothing else refers to it any more; ``eval()`` and device/dtype
    moves release them.
    """

    def __init__(self, num_templates: int, weight_shape: Sequence[int]) -> None:
        super().__init__()
        if int(num_templates) < 1:
            raise SoftshareError(f"a template bank needs at least 1 template, got {num_templates}")
        weight_shape = tuple(int(s) for s in weight_shape)
        if len(weight_shape) < 2 or min(weight_shape) < 1:
            raise SoftshareError(
                f"template shape must have at least 2 positive dims (out, in, ...), got {weight_shape}"
            )
        self.num_templates = int(num_templates)
        self.weight_shape = weight_shape
        self.templates = nn.Parameter(torch.empty(self.num_templates, *weight_shape))
        self._layers: list[SharedLayer] = []  # attached layers, in construction order
        self._cache: _Cache | None = None
        self._scratch: dict[str, Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_in, ReLU gain) for each template independently."""
        with torch.no_grad():
            for template in self.templates:
                nn.init.kaiming_normal_(template, mode="fan_in", nonlinearity="relu")

    @property
    def layers(self) -> list[SharedLayer]:
        """The layers drawing weights from this bank, in the order they were created."""
        return list(self._layers)

    def attach(self, layer: SharedLayer) -> None:
        if all(existing is not layer for existing in self._layers):
            self._layers.append(layer)
            self._cache = None

    def detach(self, layer: SharedLayer) -> None:
        self._layers = [existing for existing in self._layers if existing is not layer]
        self._cache = None

    def invalidate(self) -> None:
        """Forget the cached weights and the reusable training buffers."""
        self._cache = None
        self._scratch = {}

    # -- mixing ---------------------------------------------------------------------------
    def mix(self, coefficients: Tensor) -> Tensor:
        """Contract coefficients (..., k) with the templates into weights (..., *weight_shape).

        One matrix product over a flat view of the templates, whatever their memory layout
        (a channels-last bank yields channels-last weights without a copy).
        """
        flat, ordered_shape, inverse = _flat_layout(self.templates)
        mixed = torch.matmul(coefficients.to(flat.dtype), flat)
        lead = coefficients.shape[:-1]
        mixed = mixed.view(*lead, *ordered_shape)
        return mixed.permute(*range(len(lead)), *(len(lead) + i for i in inverse))

    def weight_for(self, layer: SharedLayer) -> Tensor:
        """The mixed weight of `layer`, from the bank-wide materialisation.

        Each materialisation hands every layer its weight once: the first layer asking again
        (the next forward pass) triggers a new one. So the weights are always as fresh as a
        forward pass, even after changes the cache cannot see (``param.data`` edits).
        """
        if torch.compiler.is_compiling() or _functional_transform_active():
            return self.mix(layer.coefficients)
        key = self._cache_key()
        cache = self._cache
        if cache is None or cache.key != key or id(layer) not in cache.weights:
            if all(existing is not layer for existing in self._layers):
                return self.mix(layer.coefficients)
            cache = self._materialise(key)
        return cache.weights.pop(id(layer))

    def _cache_key(self) -> tuple:
        params = [self.templates] + [layer.coefficients for layer in self._layers]
        device = self.templates.device.type
        autocast = torch.is_autocast_enabled(device) if _HAS_DEVICE_AUTOCAST else torch.is_autocast_enabled()
        return (
            torch.is_grad_enabled(),
            autocast,
            tuple((p.data_ptr(), p._version, p.requires_grad, p.dtype, p.device) for p in params),
        )

    def _materialise(self, key: tuple) -> _Cache:
        self._cache = None  # release the previous weights first, so their buffer can be reused
        coefficients = [layer.coefficients for layer in self._layers]
        token = next(_TOKENS)
        params = [self.templates, *coefficients]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            weights = _MixAll.apply(weakref.ref(self), token, self.templates, *coefficients)
        else:
            weights = self.mix(torch.stack(coefficients)).unbind(0)
        self._cache = _Cache(key, token, {id(layer): w for layer, w in zip(self._layers, weights)})
        return self._cache

    def _buffer(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised (shape) tensor like `like`; on CPU the same memory as last time when
        nothing but the bank refers to it any more (no page faults for bank-sized tensors)."""
        if like.device.type != "cpu" or like.is_inference():
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        buffer = self._scratch.get(name)
        if (buffer is None or buffer.shape != shape or buffer.dtype != like.dtype
                or buffer.is_inference() or not _sole_reference(buffer)):
            buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
            self._scratch[name] = buffer
        return buffer

    def train(self, mode: bool = True):
        if not mode:
            self._scratch = {}  # evaluation does not need the training buffers
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # device/dtype moves invalidate the cache
        self.invalidate()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        state["_cache"] = None  # non-leaf tensors can be neither pickled nor deep-copied
        state["_scratch"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        state = {"_cache": None, "_scratch": {}, **state}  # pickles of older versions lack these
        super().__setstate__(state)

    def extra_repr(self) -> str:
        return f"k={self.num_templates}, weight_shape={self.weight_shape}"


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


def _flat_layout(templates: Tensor) -> tuple[Tensor, tuple[int, ...], list[int]]:
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
    def forward(ctx, bank_ref, token, templates, *coefficients):
        ctx.set_materialize_grads(False)
        flat, ordered_shape, inverse = _flat_layout(templates)
        stacked = torch.stack(coefficients).to(flat.dtype)
        bank = bank_ref()
        n = stacked.shape[0]
        out = bank._buffer("weights", (n, flat.shape[1]), flat) if bank is not None else None
        weights = torch.mm(stacked, flat, out=out) if out is not None else torch.mm(stacked, flat)
        ctx.bank_ref, ctx.token = bank_ref, token
        ctx.templates, ctx.coefficients, ctx.stacked = templates, coefficients, stacked
        ctx.versions = tuple(p._version for p in (templates, *coefficients))
        permute = (0, *(1 + i for i in inverse))
        return tuple(weights.view(n, *ordered_shape).permute(*permute).unbind(0))

    @staticmethod
    def backward(ctx, *grads):
        bank = ctx.bank_ref()
        if bank is not None and bank._cache is not None and bank._cache.token == ctx.token:
            bank._cache = None  # backward ran through these weights: the next forward re-mixes
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
            grad_templates, grad_rows = _mix_backward(ctx, bank, grads, rows)
        for i, grad in zip(rows, grad_rows if grad_rows is not None else ()):
            if ctx.needs_input_grad[3 + i]:
                results[i] = grad.to(coefficients[i].dtype, copy=True)  # not views of one tensor
        return (None, None, grad_templates if ctx.needs_input_grad[2] else None, *results)


_CHUNK = 1 << 16  # elements per template row handled at once by the backward pass


def _mix_backward(ctx, bank, grads, rows):
    """dT = A^T G and dA = G T^T without stacking the layers' gradients G in memory.

    The GEMMs run over column chunks of the flat templates: each chunk of every layer's
    gradient is copied into a small (cache-resident) buffer that both products then read, so
    each gradient is read from memory once instead of three times (copy, dT, dA).
    """
    templates = ctx.templates
    flat, ordered_shape, inverse = _flat_layout(templates)
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
        grad_flat = bank._buffer("template_grad", (k, size), flat) if bank is not None else flat.new_empty(k, size)
    if need_rows:
        grad_rows = flat.new_zeros(len(rows), k)
    chunk = min(size, _CHUNK)
    staging = bank._buffer("grads", (len(rows), chunk), flat) if bank is not None else flat.new_empty(len(rows), chunk)
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
    flat, ordered_shape, inverse = _flat_layout(templates)
    forward_perm = _forward_perm(inverse)
    stacked_grads = torch.stack([grads[i].permute(*forward_perm).reshape(-1) for i in rows])
    a = torch.stack([coefficients[i] for i in rows]).to(flat.dtype)
    grad_flat = a.t() @ stacked_grads
    grad_templates = grad_flat.view(flat.shape[0], *ordered_shape).permute(0, *(1 + i for i in inverse))
    return grad_templates, (stacked_grads @ flat.t()).unbind(0)


def _forward_perm(inverse: list[int]) -> list[int]:
    """The permutation from a layer's logical weight dims to the templates' memory order."""
    return [inverse.index(d) for d in range(len(inverse))]


def init_coefficients(layers: Sequence[SharedLayer]) -> None:
    """Give the layers of one bank the rows of an orthogonally initialised (n_layers x k) matrix.

    With k >= n_layers the coefficient vectors are orthonormal, so the layers start as far
    from each other as the bank allows (the paper's initialisation).
    """
    layers = list(layers)
    if not layers:
        return
    ks = {layer.coefficients.numel() for layer in layers}
    if len(ks) != 1:
        raise SoftshareError(f"layers passed to init_coefficients use banks of different sizes {ks}")
    matrix = torch.empty(len(layers), ks.pop())
    nn.init.orthogonal_(matrix)
    with torch.no_grad():
        for layer, row in zip(layers, matrix):
            layer.coefficients.copy_(row)
