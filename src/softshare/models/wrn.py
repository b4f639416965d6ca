"""Wide ResNets and their soft-shared versions.

* CIFAR-size (32x32): the pre-activation WRN-L-w of Zagoruyko & Komodakis and the paper's
  SWRN-L-w-k (depth 6n+4): three stages of basic blocks; in every stage, the blocks after the
  first take both 3x3 convs from that stage's bank of k templates.
* ImageNet-size: bottleneck ResNets, exactly torchvision's v1.5 `resnet50` / `wide_resnet50_2`
  (same modules in the same order, same parameter count; depths 26/50/101/152): a 7x7 stride-2
  stem and max-pool, four bottleneck stages with the stride on the 3x3 conv, a 1x1 projection
  shortcut in each stage's first block, global pooling and a linear head. Sharing carries the
  paper's scheme over (`sresnet_L_k`, `swrn_L_w_k`): the blocks after the first take their 3x3
  conv from the stage's bank; `share_1x1` also draws their two 1x1 convs from one bank each (the
  1x1 convs hold two thirds of a ResNet-50 block's weights).
"""

from __future__ import annotations

import functools

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SoftshareError
from ..layers import LoopBlock, SharedConv2d, TemplateBank, init_coefficients
from .registry import register_family


class BasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity or 1x1 projection shortcut.

    The projection, used where the shape changes, reads the block's pre-activated input.
    `bank`, when given, supplies both 3x3 convs (in == out channels, stride 1).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, bank: TemplateBank | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if bank is None:
            self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
            self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        else:
            self.conv1 = SharedConv2d(bank, stride=stride, padding=1)
            self.conv2 = SharedConv2d(bank, stride=1, padding=1)
        projects = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False) if projects else None

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        residual = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + residual


class LoopBasicBlock(LoopBlock):
    """A run of shared BasicBlocks folded into one loop (see softshare.fold): both 3x3 convs once,
    BatchNorms and the scales c_t per iteration."""

    def __init__(self, width: int, length: int):
        super().__init__(length, ("conv1", "conv2"))
        self.bn1 = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(length))
        self.bn2 = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(length))
        self.conv1 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)

    def step(self, x: Tensor, t: int) -> Tensor:
        out = self.conv1(F.relu(self.bn1[t](x))) * self.scales["conv1"][t]
        out = self.conv2(F.relu(self.bn2[t](out))) * self.scales["conv2"][t]
        return out + x


class BlockStage(nn.Module):
    """A stage's `blocks`, run in order: its first block, then `num_blocks - 1` shared blocks or,
    in a folded model (`loops`), loops of those lengths."""

    def set_blocks(self, first: nn.Module, shared: Callable[[], nn.Module], loop: Callable[[int], nn.Module],
                   num_blocks: int, loops: Sequence[int] | None) -> None:
        if loops is None:
            rest = [shared() for _ in range(num_blocks - 1)]
        else:
            rest = [loop(n) for n in _loop_lengths(loops, num_blocks)]
        self.blocks = nn.ModuleList([first, *rest])

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Stage(BlockStage):
    """`depth` blocks at one width; with `num_templates`, all blocks but the first share a bank.

    With `loops` (a folded model), the blocks after the first are loops of those lengths instead.
    """

    def __init__(self, in_channels: int, width: int, num_blocks: int, stride: int, num_templates: int | None,
                 loops: Sequence[int] | None = None):
        super().__init__()
        shares = num_templates and loops is None and num_blocks > 1  # a bank with no user would be dead weight
        self.bank = TemplateBank(num_templates, (width, width, 3, 3)) if shares else None
        self.set_blocks(BasicBlock(in_channels, width, stride), lambda: BasicBlock(width, width, 1, self.bank),
                        lambda n: LoopBasicBlock(width, n), num_blocks, loops)


class WideResNet(nn.Module):
    """WRN for 32x32 inputs: stem, three stages (16w, 32w, 64w; strides 1, 2, 2), BN-ReLU-pool-linear."""

    def __init__(self, depth: int, widen: int, num_templates: int | None = None,
                 num_classes: int = 10, in_channels: int = 3, fold: dict | None = None):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise SoftshareError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if widen < 1 or (num_templates is not None and num_templates < 1):
            raise SoftshareError(f"widen factor and templates must be >= 1, got w={widen}, k={num_templates}")
        num_blocks = (depth - 4) // 6
        widths = [16 * widen, 32 * widen, 64 * widen]
        stage_loops = _stage_loops(fold, 3, None if num_templates and num_blocks > 1 else
                                   "only SWRNs with shared blocks (depth >= 16) can be folded into loops")
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.stages = nn.ModuleList()
        previous = 16
        for width, stride, loops in zip(widths, (1, 2, 2), stage_loops):
            self.stages.append(Stage(previous, width, num_blocks, stride, num_templates, loops))
            previous = width
        self.bn = nn.BatchNorm2d(previous)
        self.fc = nn.Linear(previous, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        def others(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
            elif isinstance(module, TemplateBank):
                module.reset_parameters()
                init_coefficients(module.layers)

        _init_modules(self, "fan_in", others)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return F.relu(self.bn(x))

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# Depths 26/50/101/152 name the ImageNet bottleneck nets (below); none is 6n+4.
_NOT_BOTTLENECK = r"(?!s?wrn_(?:26|50|101|152)_)"


def _init_modules(model: nn.Module, fan: str, others: Callable[[nn.Module], None]) -> None:
    """One pass over `model`'s modules in order: Kaiming-normal (ReLU, `fan` mode) convs, BatchNorms
    at (1, 0), and `others(module)` for every other module."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode=fan, nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        else:
            others(module)


def _stage_loops(fold: dict | None, num_stages: int, cannot_fold: str | None) -> list:
    """Per-stage loop lengths from a fold spec ``{"loops": [[...] per stage]}`` (softshare.fold);
    `cannot_fold` says why this net has nothing to fold (None: it can)."""
    if fold is None:
        return [None] * num_stages
    if cannot_fold:
        raise SoftshareError(cannot_fold)
    loops = fold.get("loops") if isinstance(fold, dict) else None
    if not isinstance(loops, list) or len(loops) != num_stages or not all(isinstance(s, list) for s in loops):
        stages = ", ".join(f"stage{s}" for s in range(num_stages))
        raise SoftshareError(f"fold must be {{'loops': [{stages}]}} with a list of loop lengths per stage, "
                             f"got {fold!r}")
    return loops


def _loop_lengths(loops: Sequence[int], num_blocks: int) -> list[int]:
    """A stage's loop lengths: positive, covering its `num_blocks - 1` shared blocks."""
    if any(int(n) < 1 for n in loops) or sum(loops) != num_blocks - 1:
        raise SoftshareError(f"fold loops {list(loops)} must be positive lengths summing to the "
                             f"{num_blocks - 1} shared blocks of each stage")
    return [int(n) for n in loops]


@register_family("wrn", _NOT_BOTTLENECK + r"wrn_(\d+)_(\d+)", ["wrn_16_4", "wrn_16_8", "wrn_28_10", "wrn_28_14"],
                 "pre-activation Wide ResNet WRN-L-w for 32x32 inputs (L = 6n+4)", small_example="wrn_10_1",
                 input_size=(32, 32))
def wrn(depth: int, widen: int, num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    return WideResNet(depth, widen, None, num_classes, in_channels)


@register_family("swrn", _NOT_BOTTLENECK + r"swrn_(\d+)_(\d+)_(\d+)",
                 ["swrn_16_4_1", "swrn_16_8_1", "swrn_28_10_1", "swrn_28_10_2", "swrn_28_10_6", "swrn_28_14_2"],
                 "soft-shared WRN-L-w (L = 6n+4) with a bank of k templates per stage", small_example="swrn_16_1_2",
                 input_size=(32, 32))
def swrn(depth: int, widen: int, num_templates: int, num_classes: int = 10, in_channels: int = 3,
         fold: dict | None = None) -> WideResNet:
    """`fold` (set by softshare.fold) rebuilds a folded SWRN: its shared blocks as loops."""
    if depth < 16:
        raise SoftshareError(f"swrn_{depth}_{widen}_{num_templates} has one block per stage, so nothing is "
                             f"shared; use depth 16 or more (e.g. swrn_16_{widen}_{num_templates}) or wrn_{depth}_{widen}")
    return WideResNet(depth, widen, num_templates, num_classes, in_channels, fold)


# -- ImageNet: bottleneck ResNets / Wide ResNets (torchvision v1.5) and their soft-shared versions ------
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


class BottleneckStage(BlockStage):
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
        self.set_blocks(Bottleneck(in_channels, inner, out_channels, stride),
                        lambda: Bottleneck(out_channels, inner, out_channels, 1, banks),
                        lambda n: LoopBottleneck(inner, out_channels, n), num_blocks, loops)


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
        stage_loops = _stage_loops(fold, len(layout), _cannot_fold_bottleneck(num_templates, share_1x1))
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
        def banks(module: nn.Module) -> None:
            if isinstance(module, TemplateBank):
                module.reset_parameters(functools.partial(nn.init.kaiming_normal_, mode="fan_out", nonlinearity="relu"))
                init_coefficients(module.layers)

        _init_modules(self, "fan_out", banks)
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


def _cannot_fold_bottleneck(num_templates: int | None, share_1x1: bool) -> str | None:
    if not num_templates:
        return "only soft-shared bottleneck nets (swrn_*/sresnet_*) can be folded into loops"
    if share_1x1:
        return ("a net built with share_1x1 draws each block's convs from three banks, and softshare.fold "
                "folds blocks whose shared layers use one bank; fold the 3x3-only variant instead")
    return None


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


@register_family("sresnet", rf"sresnet_({_DEPTHS})_(\d+)", ["sresnet_50_1", "sresnet_50_2", "sresnet_50_4"],
                 f"soft-shared ResNet-L with a bank of k templates per stage; {_OPTIONS}",
                 small_example="sresnet_26_2", input_size=(32, 32))
def sresnet(depth: int, num_templates: int, num_classes: int = 1000, in_channels: int = 3,
            share_1x1: bool = False, zero_init_residual: bool = False, base_width: int = 64,
            fold: dict | None = None) -> BottleneckResNet:
    """`fold` (set by softshare.fold) rebuilds a folded net: its shared blocks as loops."""
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
    return BottleneckResNet(depth, widen, num_templates, num_classes, in_channels, share_1x1, zero_init_residual,
                            base_width, fold)
