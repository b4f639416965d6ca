"""The paper's idea: each layer's weight is a learned mix of templates from a shared bank.

``W_i = sum_j alpha_ij T_j`` (Savarese & Maire, ICLR 2019). A `TemplateBank` holds the k
templates T as one parameter of shape (k, *weight_shape); every shared layer (``shared.py``)
owns its coefficients alpha_i, shape (k,), and asks the bank for its weight. `mix` is the whole
computation. `weight_for` returns the same values, but mixes all of a bank's layers at once in a
forward pass (``fast_mix.py``: one GEMM per bank and step, CPU buffers reused), which is what
makes sharing nearly free in training time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import SoftshareError
from .fast_mix import BankMixer, flat_layout


class TemplateBank(nn.Module):
    """k weight templates of one shape, held as a single parameter of shape (k, *weight_shape)."""

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
        self._layers: list[nn.Module] = []  # the shared layers using the bank, in construction order
        self._mixer = BankMixer()  # the fast path's per-forward weights and reusable buffers
        self.reset_parameters()

    def reset_parameters(self, init: Callable[[Tensor], object] | None = None) -> None:
        """Initialise each template independently, as one layer's weight: `init(template)` in place
        (a `torch.nn.init` function; default Kaiming-normal, fan_in, ReLU gain). A model family
        passes the init its plain layers get, so a shared net starts where its plain twin would."""
        with torch.no_grad():
            for template in self.templates:
                if init is None:
                    nn.init.kaiming_normal_(template, mode="fan_in", nonlinearity="relu")
                else:
                    init(template)

    @property
    def layers(self) -> list[nn.Module]:
        """The layers drawing weights from this bank, in the order they were created."""
        return list(self._layers)

    def attach(self, layer: nn.Module) -> None:
        """Register a shared layer (its constructor calls this)."""
        if all(existing is not layer for existing in self._layers):
            self._layers.append(layer)
            self.invalidate()

    def detach(self, layer: nn.Module) -> None:
        self._layers = [existing for existing in self._layers if existing is not layer]
        self.invalidate()

    def mix(self, coefficients: Tensor) -> Tensor:
        """``sum_j coefficients[..., j] * T_j``: coefficients (..., k) -> weights (..., *weight_shape).

        One matrix product over a flat view of the templates in memory order, so a channels-last
        bank yields channels-last weights without a copy.
        """
        flat, ordered_shape, inverse = flat_layout(self.templates)
        lead = coefficients.shape[:-1]
        mixed = torch.matmul(coefficients.to(flat.dtype), flat).view(*lead, *ordered_shape)
        return mixed.permute(*range(len(lead)), *(len(lead) + i for i in inverse))

    def weight_for(self, layer: nn.Module) -> Tensor:
        """`layer`'s weight in a forward pass: ``mix(layer.coefficients)``, computed for all the
        bank's layers in one go and handed out once per layer (see ``fast_mix.BankMixer``)."""
        return self._mixer.weight_for(self, layer)

    def invalidate(self) -> None:
        """Forget the fast path's weights and reusable buffers."""
        self._mixer.invalidate()

    def train(self, mode: bool = True):
        if not mode:
            self._mixer.release_buffers()  # evaluation does not need the training buffers
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # device/dtype moves invalidate the fast path's state
        self.invalidate()
        return super()._apply(fn, recurse)

    def __setstate__(self, state: dict) -> None:
        state = {k: v for k, v in state.items() if k not in ("_cache", "_scratch")}  # older pickles
        super().__setstate__({"_mixer": BankMixer(), **state})

    def __prepare_scriptable__(self):
        """torch.jit.script calls this on every submodule first: say what works instead of
        TorchScript's error about the bank's Python types."""
        raise SoftshareError("torch.jit.script cannot compile soft-shared layers (template banks); script "
                             "softshare.unshare(model) instead (plain layers, same outputs), or use torch.jit.trace "
                             "or torch.export on the model in eval mode")

    def extra_repr(self) -> str:
        return f"k={self.num_templates}, weight_shape={self.weight_shape}"


def init_coefficients(layers: Sequence[nn.Module]) -> None:
    """Give the layers of one bank the rows of an orthogonally initialised (n_layers x k) matrix.

    With k >= n_layers the coefficient vectors are orthonormal, so the layers start as far
    from each other as the bank allows (the paper's initialisation). With k = 1 the rows are
    scalars that can differ only in sign, and W and -W are one direction to |cos| (the LSM,
    folding) but different functions through a ReLU: they start positive, every layer a multiple
    of the one template (a k = 1 prefix-sum net with random signs folded but did not extrapolate;
    docs/algorithmic.md).
    """
    layers = list(layers)
    if not layers:
        return
    ks = {layer.coefficients.numel() for layer in layers}
    if len(ks) != 1:
        raise SoftshareError(f"layers passed to init_coefficients use banks of different sizes {ks}")
    matrix = torch.empty(len(layers), ks.pop())
    nn.init.orthogonal_(matrix)
    if matrix.shape[1] == 1:
        matrix.abs_()
    with torch.no_grad():
        for layer, row in zip(layers, matrix):
            layer.coefficients.copy_(row)
