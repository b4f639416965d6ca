"""Pre-activation Wide ResNets (WRN-L-w) and their soft-shared versions (SWRN-L-w-k)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SoftshareError
from ..fold.loop import LoopBlock
from ..layers import SharedConv2d, TemplateBank, init_coefficients
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


class Stage(nn.Module):
    """`depth` blocks at one width; with `num_templates`, all blocks but the first share a bank.

    With `loops` (a folded model), the blocks after the first are loops of those lengths instead.
    """

    def __init__(self, in_channels: int, width: int, num_blocks: int, stride: int, num_templates: int | None,
                 loops: Sequence[int] | None = None):
        super().__init__()
        shares = num_templates and loops is None and num_blocks > 1  # a bank with no user would be dead weight
        self.bank = TemplateBank(num_templates, (width, width, 3, 3)) if shares else None
        blocks = [BasicBlock(in_channels, width, stride)]
        if loops is None:
            blocks += [BasicBlock(width, width, 1, self.bank) for _ in range(num_blocks - 1)]
        else:
            if any(int(n) < 1 for n in loops) or sum(loops) != num_blocks - 1:
                raise SoftshareError(f"fold loops {list(loops)} must be positive lengths summing to the "
                                     f"{num_blocks - 1} shared blocks of each stage")
            blocks += [LoopBasicBlock(width, int(n)) for n in loops]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


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
        stage_loops = _stage_loops(fold, num_templates, num_blocks)
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
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
            elif isinstance(module, TemplateBank):
                module.reset_parameters()
                init_coefficients(module.layers)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return F.relu(self.bn(x))

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# Depths 26/50/101/152 name the ImageNet bottleneck nets (models/bottleneck.py); none is 6n+4.
_NOT_BOTTLENECK = r"(?!s?wrn_(?:26|50|101|152)_)"


def _stage_loops(fold: dict | None, num_templates: int | None, num_blocks: int) -> list:
    """Per-stage loop lengths from a fold spec ``{"loops": [[...], [...], [...]]}`` (softshare.fold)."""
    if fold is None:
        return [None] * 3
    loops = fold.get("loops") if isinstance(fold, dict) else None
    if not num_templates or num_blocks < 2:
        raise SoftshareError("only SWRNs with shared blocks (depth >= 16) can be folded into loops")
    if not isinstance(loops, list) or len(loops) != 3 or not all(isinstance(s, list) for s in loops):
        raise SoftshareError(f"fold must be {{'loops': [stage0, stage1, stage2]}} with a list of loop "
                             f"lengths per stage, got {fold!r}")
    return loops


@register_family("wrn", _NOT_BOTTLENECK + r"wrn_(\d+)_(\d+)", ["wrn_16_4", "wrn_16_8", "wrn_28_10", "wrn_28_14"],
                 "pre-activation Wide ResNet WRN-L-w for 32x32 inputs", small_example="wrn_10_1",
                 input_size=(32, 32))
def wrn(depth: int, widen: int, num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    return WideResNet(depth, widen, None, num_classes, in_channels)


@register_family("swrn", _NOT_BOTTLENECK + r"swrn_(\d+)_(\d+)_(\d+)",
                 ["swrn_16_4_1", "swrn_16_8_1", "swrn_28_10_1", "swrn_28_10_2", "swrn_28_10_6", "swrn_28_14_2"],
                 "soft-shared WRN-L-w with a bank of k templates per stage", small_example="swrn_16_1_2",
                 input_size=(32, 32))
def swrn(depth: int, widen: int, num_templates: int, num_classes: int = 10, in_channels: int = 3,
         fold: dict | None = None) -> WideResNet:
    """`fold` (set by softshare.fold) rebuilds a folded SWRN: its shared blocks as loops."""
    if depth < 16:
        raise SoftshareError(f"swrn_{depth}_{widen}_{num_templates} has one block per stage, so nothing is "
                             f"shared; use depth 16 or more (e.g. swrn_16_{widen}_{num_templates}) or wrn_{depth}_{widen}")
    return WideResNet(depth, widen, num_templates, num_classes, in_channels, fold)
