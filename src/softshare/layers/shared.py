"""Soft-shared Conv1d / Conv2d / Linear: drop-in layers whose weight is a mix of bank templates."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair, _reverse_repeat_tuple, _single

from ..errors import SoftshareError
from .bank import TemplateBank
from .conv1d import conv1d_channels_last


class SharedLayer(nn.Module):
    """Base of the shared layers: owns `coefficients` (k,) and an optional bias.

    The bank is registered as a submodule, so `model.parameters()` always includes the
    templates (once: PyTorch de-duplicates shared parameters).
    """

    weight_ndim: int = 0
    kind: str = ""

    def __init__(self, bank: TemplateBank, bias: bool) -> None:
        super().__init__()
        if not isinstance(bank, TemplateBank):
            raise SoftshareError(f"{type(self).__name__} needs a TemplateBank, got {type(bank).__name__}")
        if len(bank.weight_shape) != self.weight_ndim:
            raise SoftshareError(
                f"{type(self).__name__} needs {self.weight_ndim}-D templates, but the bank's "
                f"template shape is {bank.weight_shape}; make the bank with a {self.kind} weight shape"
            )
        self.bank = bank
        # A random unit vector keeps the Kaiming scale of the templates; models re-initialise
        # all layers of a bank jointly with init_coefficients().
        # Created like the templates, so a layer added to a moved/cast bank matches it.
        factory = {"dtype": bank.templates.dtype, "device": bank.templates.device}
        self.coefficients = nn.Parameter(F.normalize(torch.randn(bank.num_templates, **factory), dim=0))
        out_features = bank.weight_shape[0]
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        if self.bias is not None:
            bound = 1.0 / math.sqrt(math.prod(bank.weight_shape[1:]))
            nn.init.uniform_(self.bias, -bound, bound)
        bank.attach(self)

    @property
    def weight(self) -> Tensor:
        """The layer's current weight, ``sum_j coefficients[j] * templates[j]`` (mixed on its own;
        `forward` takes it from the bank-wide mix of all the bank's layers instead)."""
        return self.bank.mix(self.coefficients)

    @property
    def num_templates(self) -> int:
        return self.bank.num_templates


class _SharedConvNd(SharedLayer):
    kind = "conv"
    _tuple = staticmethod(_pair)

    def __init__(self, bank, stride=1, padding=0, dilation=1, groups=1, bias=False, padding_mode="zeros"):
        super().__init__(bank, bias)
        try:
            self._configure(stride, padding, dilation, groups, padding_mode)
        except SoftshareError:
            bank.detach(self)  # a layer that failed to build must not stay in the bank
            raise

    def _configure(self, stride, padding, dilation, groups, padding_mode) -> None:
        bank = self.bank
        out_channels, in_per_group, *kernel = bank.weight_shape
        if groups < 1 or out_channels % groups:
            raise SoftshareError(
                f"groups={groups} must be a positive divisor of out_channels={out_channels} "
                f"(template shape {bank.weight_shape})"
            )
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise SoftshareError(f"padding_mode must be zeros, reflect, replicate or circular, got {padding_mode!r}")
        self.out_channels = out_channels
        self.in_channels = in_per_group * groups
        self.kernel_size = tuple(kernel)
        self.stride = self._tuple(stride)
        self.padding = padding if isinstance(padding, str) else self._tuple(padding)
        self.dilation = self._tuple(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        if isinstance(self.padding, str):
            if self.padding not in ("same", "valid"):
                raise SoftshareError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
            if self.padding == "same" and any(s != 1 for s in self.stride):
                raise SoftshareError(f"padding='same' needs stride 1 (as in torch.nn), got stride={stride}")
            # What F.pad needs for a non-zeros padding_mode (as nn.ConvNd computes it).
            self._pad_twice = [0, 0] * len(self.kernel_size)
            if self.padding == "same":
                for i, (d, k) in enumerate(zip(self.dilation, self.kernel_size)):
                    total = d * (k - 1)
                    j = 2 * (len(self.kernel_size) - 1 - i)
                    self._pad_twice[j], self._pad_twice[j + 1] = total // 2, total - total // 2
        else:
            self._pad_twice = _reverse_repeat_tuple(self.padding, 2)

    def _conv(self, x: Tensor, weight: Tensor, padding) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.convolve(x, self.bank.weight_for(self))

    def convolve(self, x: Tensor, weight: Tensor) -> Tensor:
        """This layer's convolution (stride, padding, ...) with `weight` in place of its mix: for a
        caller that mixes otherwise, e.g. with the coefficients detached."""
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad_twice, mode=self.padding_mode)
            return self._conv(x, weight, padding=0)
        return self._conv(x, weight, padding=self.padding)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != self._tuple(1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + f", bias={self.bias is not None}, k={self.num_templates}"


class SharedConv2d(_SharedConvNd):
    """nn.Conv2d whose weight is mixed from a bank of (out, in/groups, kh, kw) templates."""

    weight_ndim = 4

    def _conv(self, x: Tensor, weight: Tensor, padding) -> Tensor:
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)


class SharedConv1d(_SharedConvNd):
    """nn.Conv1d whose weight is mixed from a bank of (out, in/groups, k) templates.

    With `channels_last` set (``softshare.to_channels_last`` sets it) it computes as a
    channels-last 2-D convolution, as `softshare.layers.Conv1d` does.
    """

    weight_ndim = 3
    _tuple = staticmethod(_single)
    channels_last = False

    def _conv(self, x: Tensor, weight: Tensor, padding) -> Tensor:
        conv = conv1d_channels_last if self.channels_last else F.conv1d
        return conv(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)


class SharedLinear(SharedLayer):
    """nn.Linear whose weight is mixed from a bank of (out, in) templates."""

    weight_ndim = 2
    kind = "linear"

    def __init__(self, bank: TemplateBank, bias: bool = True) -> None:
        super().__init__(bank, bias)
        self.out_features, self.in_features = bank.weight_shape

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.bank.weight_for(self), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, k={self.num_templates}")


class SharedSubclass(SharedLayer):
    """Base of the shared form of a Conv1d/Conv2d/Linear *subclass* (timm's StdConv2d, Conv2dSame,
    a quantisation-aware conv...): the subclass's own `forward` runs, and its ``self.weight`` is
    the mixed weight, so a transform its forward applies to the weight (standardisation, 'same'
    padding) applies to the mixed one. Built by `shared_subclass` (one class per subclass, still an
    instance of it) from an existing layer; `plain_class` is the subclass."""

    plain_class: type = nn.Module

    @property
    def weight(self) -> Tensor:
        return self.bank.weight_for(self)

    def __reduce_ex__(self, protocol):  # the class is made at run time: pickle the recipe
        return (_rebuild_shared_subclass, (self.plain_class,), self.__getstate__())


_SHARED_SUBCLASSES: dict[type, type] = {}


def shared_subclass(cls: type) -> type:
    """The shared form of Conv/Linear subclass `cls`: ``SharedSubclass`` first in the MRO (its
    ``weight`` property), then `cls` (its forward, hyperparameters and extra parameters)."""
    if cls not in _SHARED_SUBCLASSES:
        _SHARED_SUBCLASSES[cls] = type(f"Shared{cls.__name__}", (SharedSubclass, cls),
                                       {"plain_class": cls, "__module__": __name__,
                                        "__qualname__": f"Shared{cls.__qualname__}"})
    return _SHARED_SUBCLASSES[cls]


def _rebuild_shared_subclass(cls: type) -> SharedSubclass:
    shared = shared_subclass(cls)
    return shared.__new__(shared)


def named_banks(model: nn.Module) -> list[tuple[str, TemplateBank, list[tuple[str, SharedLayer]]]]:
    """Every bank in `model` with its canonical name and its (name, layer) users in module order.

    Module order is forward order for the project's models (and for most sequential nets).
    """
    bank_names: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, TemplateBank):
            bank_names.setdefault(id(module), name)
    groups: dict[int, tuple[TemplateBank, list[tuple[str, SharedLayer]]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, SharedLayer):
            groups.setdefault(id(module.bank), (module.bank, []))[1].append((name, module))
    return [(bank_names[key], bank, users) for key, (bank, users) in groups.items()]
