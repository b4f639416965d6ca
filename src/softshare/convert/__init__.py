"""Bringing models from elsewhere into soft sharing: `share()` converts any PyTorch model in
place (`unshare()` turns it back into plain layers); `convert_author` imports checkpoints of
the paper's reference code. Imports `layers`, `models`, `checkpoint` and `data.unpickle`."""

from .author import convert_author, read_author_checkpoint
from .share import SharePlan, ShareGroup, share, unshare

__all__ = ["share", "unshare", "SharePlan", "ShareGroup", "convert_author", "read_author_checkpoint"]
