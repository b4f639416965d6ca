"""Template banks: the shared parameters that soft-shared layers mix their weights from."""

from __future__ import annotations

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

    A layer using the bank builds its weight as ``sum_j alpha_j * T_j``. When several layers use
    the same bank, the bank materialises *all* their weights with one matrix product
    ``A @ T`` (A stacks the layers' coefficient vectors) and hands each layer its row: one GEMM
    forward and one backward per bank instead of one k-times-larger contraction and gradient
    accumulation per layer. The result is cached for the forward pass and dropped as soon as
    backward runs through it or any parameter changes in place (optimizer step, load).
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
        self._cache: tuple[tuple, dict[int, Tensor]] | None = None
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

    # -- mixing ---------------------------------------------------------------------------
    def mix(self, coefficients: Tensor) -> Tensor:
        """Contract coefficients (..., k) with the templates into weights (..., *weight_shape).

        One matrix product over a flat view of the templates, whatever their memory layout
        (a channels-last bank yields channels-last weights without a copy).
        """
        templates = self.templates
        perm = sorted(range(1, templates.dim()), key=lambda d: -templates.stride(d))
        ordered = templates.permute(0, *perm)
        if not ordered.is_contiguous():
            perm, ordered = list(range(1, templates.dim())), templates.contiguous()
        flat = ordered.reshape(self.num_templates, -1)
        mixed = torch.matmul(coefficients.to(flat.dtype), flat)
        lead = coefficients.shape[:-1]
        mixed = mixed.view(*lead, *(templates.shape[d] for d in perm))
        inverse = [perm.index(d) for d in range(1, templates.dim())]
        return mixed.permute(*range(len(lead)), *(len(lead) + i for i in inverse))

    def weight_for(self, layer: SharedLayer) -> Tensor:
        """The mixed weight of `layer`, from the bank-wide materialisation when it pays off."""
        if len(self._layers) < 2 or torch.compiler.is_compiling():
            return self.mix(layer.coefficients)
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            self._materialise(key)
        assert self._cache is not None
        weight = self._cache[1].get(id(layer))
        return weight if weight is not None else self.mix(layer.coefficients)

    def _cache_key(self) -> tuple:
        params = [self.templates] + [layer.coefficients for layer in self._layers]
        return (
            torch.is_grad_enabled(),
            torch.is_autocast_enabled(),
            tuple((p.data_ptr(), p._version, p.requires_grad, p.dtype) for p in params),
        )

    def _materialise(self, key: tuple) -> None:
        stacked = torch.stack([layer.coefficients for layer in self._layers])
        weights = self.mix(stacked)
        self._cache = (key, {id(layer): w for layer, w in zip(self._layers, weights.unbind(0))})
        if weights.requires_grad:
            # The graph behind the cached weights is freed by backward: forget them then.
            bank_ref, cached = weakref.ref(self), self._cache

            def _drop_after_backward(grad: Tensor) -> None:
                bank = bank_ref()
                if bank is not None and bank._cache is cached:
                    bank._cache = None

            weights.register_hook(_drop_after_backward)

    def _apply(self, fn, recurse=True):  # device/dtype moves invalidate the cache
        self._cache = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        state["_cache"] = None  # non-leaf tensors can be neither pickled nor deep-copied
        return state

    def extra_repr(self) -> str:
        return f"k={self.num_templates}, weight_shape={self.weight_shape}"


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

