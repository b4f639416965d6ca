"""`SoftshareCallback`: what softshare's trainer gives a shared model, for a `lightning.Trainer`.

    from softshare.train.lightning import SoftshareCallback
    trainer = lightning.Trainer(callbacks=[SoftshareCallback(recurrence_reg=0.1, tie=0.99)])

- the LSM history of every bank (`analysis.lsm.record_lsm`: history.jsonl, one figure per epoch,
  history.png, or .pdf/.svg by `figure_format`) in `run_dir/lsm/`, from the start and after every
  `lsm_every` epochs;
- the recurrence regulariser added to the training loss: its weighted gradient is added to the
  loss's after each backward (the same gradient as ``loss + recurrence_reg * penalty``), and
  ``train_recurrence_penalty`` is logged;
- sharing coefficients without weight decay: a group that decays them is split at the start of
  fit, or, when an lr scheduler holds the optimizer's groups, the fit stops with one line naming
  `softshare.param_groups` for ``configure_optimizers``;
- `tie` (a threshold) and/or `unshare` at the end of fit, if asked.

An optional extra: ``pip install 'softshare[lightning]'``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..analysis.lsm import record_lsm
from ..analysis.similarity import recurrence_penalty
from ..convert import unshare as unshare_model
from ..errors import SoftshareError
from ..fold import tie as tie_model
from ..layers import SharedLayer, named_banks
from ..storage import check_figure_format
from .epoch import scheduled_weight

try:
    import lightning.pytorch as pl
except ImportError:  # the extra is not installed: say how to get it, once, where it is used
    raise SoftshareError("softshare's Lightning callback needs the lightning package: "
                         "pip install 'softshare[lightning]' -c constraints.txt") from None

log = logging.getLogger("softshare.train")


class SoftshareCallback(pl.Callback):
    """See the module docstring. `run_dir` (default: the trainer's ``default_root_dir``) holds
    ``lsm/``; `lsm_every` 0 turns the history off; `tie` is a |cos| threshold (e.g. 0.99);
    `figure_format` png, or vector pdf or svg for a paper; `recurrence_reach`, `recurrence_signed`
    and the weight's schedule (`recurrence_reg_start`, `_warmup`, `_anneal`, in epochs) act as
    `softshare train`'s fields of those names."""

    def __init__(self, recurrence_reg: float = 0.0, lsm_every: int = 1, run_dir: str | os.PathLike | None = None,
                 tie: float | None = None, unshare: bool = False, exclude_coefficients_from_decay: bool = True,
                 figure_format: str = "png", recurrence_reach: int = 1, recurrence_signed: bool = False,
                 recurrence_reg_start: float = 0.0, recurrence_reg_warmup: float = 0.0,
                 recurrence_reg_anneal: float = 0.0) -> None:
        super().__init__()
        schedule = (recurrence_reg_start, recurrence_reg_warmup, recurrence_reg_anneal)
        if recurrence_reg < 0 or lsm_every < 0 or min(schedule) < 0:
            raise SoftshareError(f"recurrence_reg, lsm_every and the recurrence_reg_start / _warmup / _anneal epochs "
                                 f"must be >= 0, got {recurrence_reg}, {lsm_every} and {schedule}")
        self.recurrence_reg, self.lsm_every, self.run_dir = recurrence_reg, lsm_every, run_dir
        self.recurrence_reach, self.recurrence_signed = recurrence_reach, recurrence_signed
        self.schedule = schedule
        self.epoch = 0.0  # the (fractional) epoch of the step in progress, for the weight's schedule
        self.tie, self.unshare = tie, unshare
        self.exclude_coefficients_from_decay = exclude_coefficients_from_decay
        self.tie_result = None  # what tie() did, after fit
        self.figure_format = check_figure_format(figure_format)

    def _run_dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.run_dir if self.run_dir is not None else trainer.default_root_dir)

    # -- start --------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not named_banks(pl_module):
            raise SoftshareError(f"{type(pl_module).__name__} has no template banks: share it first "
                                 f"(softshare.share(model, k)) to use the softshare callback")
        if self.exclude_coefficients_from_decay:  # before a resumed run's optimizer state is loaded
            for index, optimizer in enumerate(trainer.optimizers):
                _no_decay_on_coefficients(trainer, index, optimizer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after a resumed run's loops are restored: a resumed run keeps the history it has
        if self.lsm_every and trainer.is_global_zero and trainer.current_epoch == 0:
            record_lsm(pl_module, self._run_dir(trainer), 0, self.figure_format)  # the starting point

    # -- each step: the regulariser's gradient ------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self.epoch = trainer.current_epoch + batch_idx / max(trainer.num_training_batches, 1)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weight = scheduled_weight(self.recurrence_reg, self.epoch, *self.schedule)
        if not weight:
            return
        penalty = recurrence_penalty(pl_module, self.recurrence_reach, self.recurrence_signed)
        scale = weight / trainer.accumulate_grad_batches  # Lightning divides the loss likewise
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # fp16: the loss was scaled
        if scaler is not None:
            scale = scale * scaler.get_scale()
        (scale * penalty).backward()
        pl_module.log("train_recurrence_penalty", penalty.detach(), on_step=False, on_epoch=True)

    # -- each epoch: the LSM history ----------------------------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.lsm_every and trainer.is_global_zero and epoch % self.lsm_every == 0:
            record_lsm(pl_module, self._run_dir(trainer), epoch, self.figure_format)

    # -- end ----------------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.tie is not None:
            self.tie_result = tie_model(pl_module, self.tie)
            log.info("%s", self.tie_result.summary())
        if self.unshare:
            unshare_model(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"recurrence_reg": self.recurrence_reg, "lsm_every": self.lsm_every}


def _no_decay_on_coefficients(trainer: pl.Trainer, index: int, optimizer: torch.optim.Optimizer,
                              model: torch.nn.Module) -> None:
    """Move sharing coefficients out of `optimizer`'s decaying groups into groups without decay."""
    coefficients = {id(m.coefficients) for m in model.modules() if isinstance(m, SharedLayer)}
    decaying = [g for g in optimizer.param_groups if g.get("weight_decay", 0)
                and any(id(p) in coefficients for p in g["params"])]
    if not decaying:
        return
    if any(config.scheduler.optimizer is optimizer for config in trainer.lr_scheduler_configs):
        raise SoftshareError("the optimizer decays the sharing coefficients, and its lr scheduler holds its "
                             "parameter groups, so they cannot be split now: build it in configure_optimizers "
                             "with softshare.param_groups(self, weight_decay) (coefficients without decay)")
    for group in decaying:
        moved = [p for p in group["params"] if id(p) in coefficients]
        group["params"] = [p for p in group["params"] if id(p) not in coefficients]
        optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": moved,
                                   "weight_decay": 0.0})
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    log.info("optimizer %d: sharing coefficients moved to groups without weight decay", index)
