"""Optimizers for soft-shared models: parameter groups (no decay on coefficients), lr throttle, and
the learning-rate schedule (a pure function of the position, so a resume needs no scheduler state)."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..errors import SoftshareError
from ..layers import SharedLayer
from ..wrappers import unwrap_model
from .config import TrainConfig, apply_overrides

log = logging.getLogger("softshare.train")


def param_groups(model: nn.Module, weight_decay: float, coefficient_lr_scale: float = 1.0,
                 coefficient_weight_decay: float = 0.0) -> list[dict]:
    """Two optimizer groups: sharing coefficients without weight decay, everything else with it.

    Decaying the coefficients would shrink every layer's weight towards zero regardless of the
    templates, so the paper trains them without decay (`coefficient_weight_decay` sets one). The
    coefficient group carries ``lr_scale`` = `coefficient_lr_scale`: the trainer's schedule
    multiplies it in, so coefficients can learn faster than templates (with Adam they otherwise
    move about as far per step as any template entry, i.e. barely, relative to their unit norm).
    """
    coefficient_ids = {id(m.coefficients) for m in model.modules() if isinstance(m, SharedLayer)}
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if id(param) in coefficient_ids else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": coefficient_weight_decay,
               **({"lr_scale": coefficient_lr_scale} if coefficient_lr_scale != 1.0 else {})}]
    return [g for g in groups if g["params"]]


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (paper recipe), Adam (L2 decay, as DeepThinking) or AdamW; no decay on sharing coefficients.

    Fused kernels: the unfused step allocates a parameter-sized temporary for weight decay,
    which for a k=6 WRN-28-10 bank (88 MB) is page-faulted in again on every CPU step.
    With `lr_throttle` the iteration weights of an algorithmic net learn at lr / depth (group key
    ``lr_scale``, which the schedule multiplies in), as DeepThinking trains its maze nets.
    """
    throttled: set[int] = set()
    if config.lr_throttle:
        iteration_parameters = getattr(unwrap_model(model), "iteration_parameters", None)
        if iteration_parameters is None:
            raise SoftshareError(f"lr_throttle slows the iteration weights of an algorithmic net; {config.model} "
                                 "has none, so train it without --lr-throttle")
        throttled = {id(p) for p in iteration_parameters()}
    groups = []
    for group in param_groups(model, config.weight_decay, config.coef_lr_scale, config.coef_weight_decay):
        base = group.get("lr_scale", 1.0)
        for scale, params in ((base, [p for p in group["params"] if id(p) not in throttled]),
                              (base / config.depth, [p for p in group["params"] if id(p) in throttled])):
            if params:
                groups.append({**group, "params": params, "lr_scale": scale, "lr": config.lr * scale})
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, fused=True)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, fused=True)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, fused=True)


def learning_rate(config: TrainConfig, epoch: float) -> float:
    """The schedule as a pure function of (fractional) epoch: resuming needs no scheduler state."""
    if config.warmup_epochs and epoch < config.warmup_epochs:
        return config.lr * (epoch + 1e-3) / config.warmup_epochs
    if config.schedule == "multistep":
        return config.lr * config.lr_gamma ** sum(epoch >= m for m in config.lr_milestones)
    if config.schedule == "cosine":
        span = max(config.epochs - config.warmup_epochs, 1e-9)
        return 0.5 * config.lr * (1 + math.cos(math.pi * min((epoch - config.warmup_epochs) / span, 1.0)))
    return config.lr


def scale_lr(config: TrainConfig, world_size: int) -> TrainConfig:
    """lr x global batch / lr_reference_batch (Goyal et al. 2017: 0.1 x batch/256 for ImageNet)."""
    lr = config.lr * config.batch_size * world_size / config.lr_reference_batch
    log.info("lr %.4g x global batch %d / %d = %.4g", config.lr, config.batch_size * world_size,
             config.lr_reference_batch, lr)
    return apply_overrides(config, {"lr": lr, "lr_reference_batch": 0}, "linear lr scaling")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """`lr` for every group, times the group's ``lr_scale`` (the throttled iteration weights)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
