"""Soft-sharing building blocks: template banks and the layers that mix weights from them."""

from .bank import TemplateBank, init_coefficients
from .memory_format import to_channels_last
from .shared import SharedConv1d, SharedConv2d, SharedLayer, SharedLinear, named_banks

__all__ = [
    "TemplateBank",
    "SharedLayer",
    "SharedConv1d",
    "SharedConv2d",
    "SharedLinear",
    "init_coefficients",
    "named_banks",
    "to_channels_last",
]
