"""Channels-last conversion that also handles 5-D template banks and 1-D convolutions."""

from __future__ import annotations

import torch
from torch import nn

from .bank import TemplateBank
from .conv1d import Conv1d
from .shared import SharedConv1d


def to_channels_last(model: nn.Module) -> nn.Module:
    """Put 4-D parameters/buffers and conv2d template banks into channels-last layout, in place,
    and have softshare's 1-D convolutions (`Conv1d`, `SharedConv1d`) compute in channels-last
    layout too (see `softshare.layers.conv1d`; torch's own nn.Conv1d stays as it is).

    ``model.to(memory_format=torch.channels_last)`` rejects the 5-D (k, out, in, kh, kw)
    template tensors; here each bank is stored as (k, out, kh, kw, in) in memory so the mixed
    weights come out channels-last with no copy (see TemplateBank.mix).
    """
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if isinstance(module, TemplateBank):  # only conv2d banks: 4-D ones hold Conv1d weights
                    if name == "templates" and param.dim() == 5:
                        param.data = param.data.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
                elif param.dim() == 4:
                    param.data = param.data.contiguous(memory_format=torch.channels_last)
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None and buf.dim() == 4:
                    setattr(module, name, buf.contiguous(memory_format=torch.channels_last))
            if isinstance(module, TemplateBank):
                module.invalidate()
            if isinstance(module, (Conv1d, SharedConv1d)):
                module.channels_last = True
    return model
