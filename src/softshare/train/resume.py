"""Resuming a run: which checkpoint continues it, which settings may change, and restoring the
optimizer, RNG and position from its training state (see docs/DESIGN.md, "Resume")."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..checkpoint import find_checkpoint, load_checkpoint
from ..errors import SoftshareError
from .algorithmic import check_model
from .config import TrainConfig, apply_overrides, validate

log = logging.getLogger("softshare.train")

# The settings a resume may change: how long and how fast to train, how often to look. Anything
# else would make the checkpoint's state mean something different (model, data, optimizer...).
SAFE_ON_RESUME = ("epochs", "lr", "schedule", "lr_milestones", "lr_gamma", "warmup_epochs", "grad_clip",
                  "eval_every", "checkpoint_every", "lsm_every")
# Where and how the run executes, not what it computes: silently taken from the command line.
RUNTIME_FIELDS = ("device", "amp", "compile", "channels_last", "deterministic", "data_root", "download",
                  "name", "out_dir", "workers", "logger", "figure_format")


def _resumed_config(config: TrainConfig, checkpoint, changes: dict[str, Any],
                    world_size: int = 1) -> tuple[TrainConfig, dict]:
    """The saved config with the allowed `changes` applied, and {field: [old, new]} of those."""
    saved_values = checkpoint.meta.get("config")
    if not saved_values:
        raise SoftshareError(f"checkpoint {checkpoint.path} records no training config (it was converted or "
                             f"folded, not saved by softshare train), so it cannot be resumed; start a new run")
    saved = apply_overrides(TrainConfig(), saved_values, f"checkpoint {checkpoint.path}")
    validate(saved)
    changes = _scaled_lr_change(config, saved, changes, world_size)
    changed, refused = {}, []
    for key, value in changes.items():
        old = getattr(saved, key)
        if key in RUNTIME_FIELDS or value == old:
            continue
        if key in SAFE_ON_RESUME:
            changed[key] = [old, value]
        else:
            refused.append(f"--{key.replace('_', '-')} (run: {old!r}, asked: {value!r})")
    if refused:
        raise SoftshareError(f"cannot change {', '.join(refused)} when resuming: the checkpoint was trained with "
                             f"it; drop the flag, or start a new run with another --name (a resume may change "
                             f"only {', '.join(SAFE_ON_RESUME)})")
    runtime = {k: v for k, v in changes.items() if k in RUNTIME_FIELDS}
    resumed = apply_overrides(saved, {**runtime, **{k: new for k, (_, new) in changed.items()}}, "command line")
    validate(resumed)
    check_model(resumed)
    return resumed, changed


def _scaled_lr_change(config: TrainConfig, saved: TrainConfig, changes: dict[str, Any],
                      world_size: int) -> dict[str, Any]:
    """`changes` in the saved config's terms. A run records the lr it used (linear scaling done,
    lr_reference_batch 0); an lr asked for with a reference batch (the flag's, else the config's,
    e.g. an ImageNet preset's) is scaled the same way first, so repeating the command that
    started the run changes nothing and `--lr` means what it meant then."""
    if "lr_reference_batch" not in changes and not ("lr" in changes and config.lr_reference_batch):
        return changes
    changes = dict(changes)
    reference = changes.pop("lr_reference_batch", config.lr_reference_batch)
    if reference:
        changes["lr"] = changes.get("lr", config.lr) * saved.batch_size * world_size / reference
    return changes


def _checkpoint_to_resume(resume: str | None, run_path: Path):
    if resume is None:
        return None
    if resume == "auto":
        last = run_path / "checkpoints" / "last"
        return load_checkpoint(last) if last.exists() else None
    last = Path(resume) / "checkpoints" / "last"  # a run directory resumes from its latest state
    return load_checkpoint(last if last.exists() else find_checkpoint(resume))


def _check_train_state(state: Any, path: Path) -> None:
    """Refuse a state.pt whose contents are not what `_save` writes, before any of it is used."""
    expected = {"epoch": int, "batch": int, "optimizer": dict, "rng_cpu": torch.Tensor}
    wrong = [key for key, kind in expected.items()
             if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool)]
    if not wrong and (state["epoch"] < 0 or state["batch"] < 0):
        wrong = ["epoch" if state["epoch"] < 0 else "batch"]
    if not wrong and not isinstance(state.get("epoch_sums", torch.zeros(3)), torch.Tensor):
        wrong = ["epoch_sums"]
    if wrong:
        raise SoftshareError(f"{path / 'state.pt'} does not hold the training state softshare writes (bad or missing "
                             f"{', '.join(wrong)}); restore it from a backup, or delete it and start a new run "
                             f"from scratch")


def _restore(checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
             ema: AveragedModel | None = None):
    if checkpoint.train_state is None:
        raise SoftshareError(f"checkpoint {checkpoint.path} holds weights only (no optimizer state) and cannot "
                             f"be resumed; start a new run from it instead")
    state = checkpoint.train_state
    _check_train_state(state, checkpoint.path)
    try:
        model.load_state_dict(checkpoint.state_dict, strict=True)
    except RuntimeError as err:
        raise SoftshareError(f"checkpoint {checkpoint.path} does not fit this model: {str(err).splitlines()[0]}") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and "ema" in state:  # a run whose checkpoint has no EMA state starts it from here
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
    except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as err:
        raise SoftshareError(f"{checkpoint.path / 'state.pt'} does not fit this run's optimizer, EMA or RNG "
                             f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); restore it "
                             f"from a backup, or start a new run") from None
    sums = state.get("epoch_sums")
    monitor = state["loss_monitor"] if isinstance(state.get("loss_monitor"), dict) else None
    log.info("resumed from %s at epoch %d, step %d", checkpoint.path, state["epoch"] + 1, state["batch"])
    return state["epoch"], state["batch"], state.get("best_metric"), state.get("best_epoch"), sums, monitor
