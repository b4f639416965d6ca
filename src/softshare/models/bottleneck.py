"""ImageNet-style bottleneck ResNets (torchvision's v1.5 resnet50 / wide_resnet50_2) and their
soft-shared versions (SResNet / SWRN-L-w-k).

The unshared nets are torchvision's architecture exactly (same modules in the same order, same
parameter count): a 7x7 stride-2 stem and max-pool, four bottleneck stages with the stride on the
3x3 conv, a 1x1 projection shortcut in each stage's first block, global pooling and a linear
head. Sharing carries the paper's CIFAR scheme over: in every stage, the blocks after the first
take their 3x3 convs from that stage's bank of k templates; `share_1x1` also draws their two 1x1
convs from one bank each (the 1x1 convs hold two thirds of a ResNet-50 block's weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SoftshareError
from ..fold.loop import LoopBlock
from ..layers import SharedConv2d, TemplateBank, init_coefficients
from .registry import register_family

# Blocks per stage by depth (3 convs per block + stem + head): torchvision/timm's layouts.
STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3),
}
EXPANSION = 4  # output channels of a block = 4 x its planes
_DEPTHS = "|".join(str(d) for d in STAGE_BLOCKS)


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1-BN, + shortcut, ReLU (torchvision v1.5).

    `banks` maps a role ("conv1", "conv2", "conv3") to the bank that supplies that conv; the
    others are plain convs. `downsample` (1x1 conv + BN) is built where the shape changes.
    """

    def __init__(self, in_channels: int, inner: int, out_channels: int, stride: int,
                 banks: dict[str, TemplateBank] | None = None) -> None:
        super().__init__()
        banks = banks or {}

        def conv(role: str, cin: int, cout: int, size: int, conv_stride: int) -> nn.Module:
            if role in banks:
                return SharedConv2d(banks[role], stride=conv_stride, padding=size // 2)
            return nn.Conv2d(cin, cout, size, conv_stride, size // 2, bias=False)

        self.conv1 = conv("conv1", in_channels, inner, 1, 1)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = conv("conv2", inner, inner, 3, stride)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = conv("conv3", inner, out_channels, 1, 1)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class LoopBottleneck(LoopBlock):
    """A run of shared Bottlenecks (3x3 shared only) folded into one loop (see softshare.fold):
    the 3x3 conv once with its scales c_t; the 1x1 convs, which were never shared, and every
    BatchNorm once per iteration."""

    def __init__(self, inner: int, out_channels: int, length: int) -> None:
        super().__init__(length, ("conv2",))
        self.conv1 = nn.ModuleList(nn.Conv2d(out_channels, inner, 1, bias=False) for _ in range(length))
        self.bn1 = nn.ModuleList(nn.BatchNorm2d(inner) for _ in range(length))
        self.conv2 = nn.Conv2d(inner, inner, 3, 1, 1, bias=False)
        self.bn2 = nn.ModuleList(nn.BatchNorm2d(inner) for _ in range(length))
        self.conv3 = nn.ModuleList(nn.Conv2d(inner, out_channels, 1, bias=False) for _ in range(length))
        self.bn3 = nn.ModuleList(nn.BatchNorm2d(out_channels) for _ in range(length))

    def step(self, x: Tensor, t: int) -> Tensor:
        out = F.relu(self.bn1[t](self.conv1[t](x)))
        out = F.relu(self.bn2[t](self.conv2(out) * self.scales["conv2"][t]))
        out = self.bn3[t](self.conv3[t](out))
        return F.relu(out + x)


class BottleneckStage(nn.Module):
    """`num_blocks` bottlenecks; with `num_templates`, all blocks but the first share banks.

    With `loops` (a folded model), the blocks after the first are loops of those lengths instead.
    """

    def __init__(self, in_channels: int, inner: int, out_channels: int, num_blocks: int, stride: int,
                 num_templates: int | None, share_1x1: bool, loops: Sequence[int] | None = None) -> None:
        super().__init__()
        shares = bool(num_templates) and loops is None and num_blocks > 1
        self.bank = TemplateBank(num_templates, (inner, inner, 3, 3)) if shares else None
        self.bank_1x1_in = self.bank_1x1_out = None
        if shares and share_1x1:
            self.bank_1x1_in = TemplateBank(num_templates, (inner, out_channels, 1, 1))
            self.bank_1x1_out = TemplateBank(num_templates, (out_channels, inner, 1, 1))
        banks = {role: bank for role, bank in (("conv1", self.bank_1x1_in), ("conv2", self.bank),
                                               ("conv3", self.bank_1x1_out)) if bank is not None}
        blocks: list[nn.Module] = [Bottleneck(in_channels, inner, out_channels, stride)]
        if loops is None:
            blocks += [Bottleneck(out_channels, inner, out_channels, 1, banks) for _ in range(num_blocks - 1)]
        else:
            if any(int(n) < 1 for n in loops) or sum(loops) != num_blocks - 1:
                raise SoftshareError(f"fold loops {list(loops)} must be positive lengths summing to the "
                                     f"{num_blocks - 1} shared blocks of the stage")
            blocks += [LoopBottleneck(inner, out_channels, int(n)) for n in loops]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class BottleneckResNet(nn.Module):
    """ResNet-{26,50,101,152} with bottleneck width `widen` x planes (2: Wide ResNet-50-2).

    `base_width` is the stem's channels and the first stage's planes (64 in torchvision; smaller
    values give CPU-sized nets with the same structure). `zero_init_residual` zeroes each block's
    last BN scale so every block starts as the identity (Goyal et al. 2017).
    """

    def __init__(self, depth: int, widen: int, num_templates: int | None = None, num_classes: int = 1000,
                 in_channels: int = 3, share_1x1: bool = False, zero_init_residual: bool = False,
                 base_width: int = 64, fold: dict | None = None) -> None:
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise SoftshareError(f"bottleneck ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")
        if widen < 1 or base_width < 1 or (num_templates is not None and num_templates < 1):
            raise SoftshareError(f"widen factor, base_width and templates must be >= 1, got w={widen}, "
                                 f"base_width={base_width}, k={num_templates}")
        layout = STAGE_BLOCKS[depth]
        stage_loops = _stage_loops(fold, num_templates, share_1x1, layout)
        self.conv1 = nn.Conv2d(in_channels, base_width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.stages = nn.ModuleList()
        previous = base_width
        for s, (num_blocks, loops) in enumerate(zip(layout, stage_loops)):
            planes = base_width * 2 ** s
            out_channels = planes * EXPANSION
            self.stages.append(BottleneckStage(previous, planes * widen, out_channels, num_blocks, 1 if s == 0 else 2,
                                               num_templates, share_1x1, loops))
            previous = out_channels
        self.fc = nn.Linear(previous, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """torchvision's initialisation: Kaiming-normal (fan_out) convs and templates, BN (1, 0),
        nn.Linear's default; orthogonal coefficient vectors per bank (the paper's)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, TemplateBank):
                for template in module.templates.data:
                    nn.init.kaiming_normal_(template, mode="fan_out", nonlinearity="relu")
                init_coefficients(module.layers)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, (Bottleneck, LoopBottleneck)):
                    for bn in module.bn3 if isinstance(module.bn3, nn.ModuleList) else [module.bn3]:
                        nn.init.zeros_(bn.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.forward_features(x), 1).flatten(1))


def _stage_loops(fold: dict | None, num_templates: int | None, share_1x1: bool,
                 layout: Sequence[int]) -> list:
    """Per-stage loop lengths from a fold spec ``{"loops": [[...] x 4]}`` (softshare.fold)."""
    if fold is None:
        return [None] * len(layout)
    if not num_templates:
        raise SoftshareError("only soft-shared bottleneck nets (swrn_*/sresnet_*) can be folded into loops")
    if share_1x1:
        raise SoftshareError("a net built with share_1x1 draws each block's convs from three banks, and "
                             "softshare.fold folds blocks whose shared layers use one bank; fold the "
                             "3x3-only variant instead")
    loops = fold.get("loops") if isinstance(fold, dict) else None
    if not isinstance(loops, list) or len(loops) != len(layout) or not all(isinstance(s, list) for s in loops):
        raise SoftshareError(f"fold must be {{'loops': [stage0, ..., stage3]}} with a list of loop "
                             f"lengths per stage, got {fold!r}")
    return loops


_OPTIONS = "options: share_1x1, zero_init_residual, base_width"


@register_family("resnet", rf"resnet_({_DEPTHS})", ["resnet_50", "resnet_101"],
                 f"torchvision's ResNet (v1.5 bottleneck) for ImageNet-size inputs; {_OPTIONS}",
                 small_example="resnet_26", input_size=(32, 32))
def resnet(depth: int, num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False,
           base_width: int = 64) -> BottleneckResNet:
    return BottleneckResNet(depth, 1, None, num_classes, in_channels, False, zero_init_residual, base_width)


@register_family("wrn_bottleneck", rf"wrn_({_DEPTHS})_(\d+)", ["wrn_50_2", "wrn_101_2"],
                 f"torchvision's Wide ResNet-L-w (bottleneck, wide_resnet50_2 = wrn_50_2); {_OPTIONS}",
                 small_example="wrn_26_1", input_size=(32, 32))
def wrn_bottleneck(depth: int, widen: int, num_classes: int = 1000, in_channels: int = 3,
                   zero_init_residual: bool = False, base_width: int = 64) -> BottleneckResNet:
    return BottleneckResNet(depth, widen, None, num_classes, in_channels, False, zero_init_residual, base_width)


def _check_shared(depth: int) -> None:
    if depth not in STAGE_BLOCKS:
        raise SoftshareError(f"bottleneck ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")


@register_family("sresnet", rf"sresnet_({_DEPTHS})_(\d+)", ["sresnet_50_1", "sresnet_50_2", "sresnet_50_4"],
                 f"soft-shared ResNet-L with a bank of k templates per stage; {_OPTIONS}",
                 small_example="sresnet_26_2", input_size=(32, 32))
def sresnet(depth: int, num_templates: int, num_classes: int = 1000, in_channels: int = 3,
            share_1x1: bool = False, zero_init_residual: bool = False, base_width: int = 64,
            fold: dict | None = None) -> BottleneckResNet:
    """`fold` (set by softshare.fold) rebuilds a folded net: its shared blocks as loops."""
    _check_shared(depth)
    return BottleneckResNet(depth, 1, num_templates, num_classes, in_channels, share_1x1, zero_init_residual,
                            base_width, fold)


@register_family("swrn_bottleneck", rf"swrn_({_DEPTHS})_(\d+)_(\d+)",
                 ["swrn_50_2_1", "swrn_50_2_2", "swrn_50_2_4"],
                 f"soft-shared bottleneck Wide ResNet-L-w with a bank of k templates per stage; {_OPTIONS}",
                 small_example="swrn_26_1_2", input_size=(32, 32))
def swrn_bottleneck(depth: int, widen: int, num_templates: int, num_classes: int = 1000, in_channels: int = 3,
                    share_1x1: bool = False, zero_init_residual: bool = False, base_width: int = 64,
                    fold: dict | None = None) -> BottleneckResNet:
    """`fold` (set by softshare.fold) rebuilds a folded net: its shared blocks as loops."""
    _check_shared(depth)
    return BottleneckResNet(depth, widen, num_templates, num_classes, in_channels, share_1x1, zero_init_residual,
                            base_width, fold)
