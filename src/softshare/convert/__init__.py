"""Bringing models from elsewhere into soft sharing: `share()` converts any PyTorch model in
place; `convert_author` imports checkpoints of the paper's reference code. Imports `layers`,
`models`, `checkpoint` and `data.unpickle`."""

from .author import convert_author, read_author_checkpoint
from .share import share

__all__ = ["share", "convert_author", "read_author_checkpoint"]
