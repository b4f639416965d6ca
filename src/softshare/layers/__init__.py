"""Soft-sharing building blocks: template banks, the layers that mix weights from them, and the
explicit loop (`LoopBlock`) that runs of collinear shared blocks fold into."""

from .bank import TemplateBank, init_coefficients
from .conv1d import Conv1d, conv1d_channels_last
from .loop import LoopBlock, loop_blocks, set_iterations
from .memory_format import to_channels_last
from .shared import SharedConv1d, SharedConv2d, SharedLayer, SharedLinear, named_banks

__all__ = [
    "TemplateBank",
    "SharedLayer",
    "SharedConv1d",
    "SharedConv2d",
    "SharedLinear",
    "Conv1d",
    "conv1d_channels_last",
    "init_coefficients",
    "named_banks",
    "to_channels_last",
    "LoopBlock",
    "loop_blocks",
    "set_iterations",
]
