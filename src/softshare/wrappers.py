"""See through the wrappers training puts around a model."""

from __future__ import annotations

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile / (Distributed)DataParallel wrappers.

    Wrappers prefix every parameter and bank name (``_orig_mod.``, ``module.``), which would
    leak into checkpoints and figures.
    """
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model
