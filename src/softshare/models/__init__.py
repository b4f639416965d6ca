"""Model families. Importing this package registers them all."""

from . import wrn  # noqa: F401  (registers wrn_*, swrn_*; resnet_*, sresnet_* and the bottleneck wrn_*/swrn_*)
from . import algorithmic  # noqa: F401  (registers maze_*, prefix_*)
from .registry import create_model, list_families, list_models, register_family

__all__ = ["create_model", "list_models", "list_families", "register_family"]
