"""1-D convolutions in channels-last layout: (N, C, L) computed as the channels-last 2-D
convolution of its (N, C, 1, L) view.

torch has no channels-last memory format for 3-D tensors, so on CPU ``F.conv1d`` hands oneDNN a
plain (N, C, L) tensor, which oneDNN reorders into its blocked layout and back around every
convolution; its backward is slow too when the input channels are not a multiple of 16 (as in
DeepThinking's recall conv, width + 1 input channel). The same convolution of the (N, C, 1, L)
view in channels-last layout runs oneDNN's direct channels-last kernels with no reorder (the
width-32 prefix-sum convs: ~1.4x forward, ~1.3x forward + backward, ~3x for the recall conv's
backward on one Zen 5 core; benchmarks/README.md). The result is the same convolution (up to
floating-point summation order); it comes back with channels-last strides (C*L, 1, C), which
elementwise ops keep, so in a stack of such convs no layout changes hands.

`softshare.to_channels_last(model)` switches a model's `Conv1d` and `SharedConv1d` layers to it,
as it puts 4-D weights into channels-last layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _single


def conv1d_channels_last(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                         dilation=1, groups: int = 1) -> Tensor:
    """``F.conv1d`` computed as a channels-last 2-D convolution (an unbatched input as ``F.conv1d``)."""
    if x.dim() != 3:
        return F.conv1d(x, weight, bias, stride, padding, dilation, groups)
    padding = padding if isinstance(padding, str) else (0, _single(padding)[0])
    x = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)
    out = F.conv2d(x, weight.unsqueeze(2), bias, (1, _single(stride)[0]), padding, (1, _single(dilation)[0]), groups)
    return out.squeeze(2)


class Conv1d(nn.Conv1d):
    """``nn.Conv1d`` that computes with `conv1d_channels_last` once `channels_last` is set
    (``softshare.to_channels_last`` sets it); same parameters, state dict and results."""

    channels_last = False

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if not self.channels_last:
            return super()._conv_forward(input, weight, bias)
        padding = self.padding
        if self.padding_mode != "zeros":
            input, padding = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        return conv1d_channels_last(input, weight, bias, self.stride, padding, self.dilation, self.groups)
