"""Resuming a run: which run and checkpoint continue, which settings may change, and restoring the
optimizer, RNG and position from its training state (see docs/DESIGN.md, "Resume").

`--resume RUN` always continues RUN where it lives (never a directory named by the config);
`--resume auto` continues ``out_dir/name``. The saved config wins: settings given with the resume
apply only where they are safe (SAFE_ON_RESUME) or say where the run executes (RUNTIME_FIELDS),
each with a logged line and an entry in run_info.json; anything else is refused, and so is a
preset the run was not trained with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..checkpoint import META_FILE, MODEL_FILE, find_checkpoint, load_checkpoint, read_meta
from ..errors import SoftshareError
from .algorithmic import check_model
from .config import PRESETS, TrainConfig, apply_overrides, body_defaults, validate

# The settings a resume may change: how long and how fast to train, how often to look. Anything
# else would make the checkpoint's state mean something different (model, data, optimizer...).
SAFE_ON_RESUME = ("epochs", "lr", "schedule", "lr_milestones", "lr_gamma", "warmup_epochs", "grad_clip",
                  "eval_every", "checkpoint_every", "lsm_every")
# Where and how the run executes, not what it computes: applied with a logged line (data_root only
# when the data there are the run's own: the training state records their fingerprint).
RUNTIME_FIELDS = ("device", "amp", "compile", "channels_last", "deterministic", "data_root", "download",
                  "workers", "logger", "figure_format")
LOCATION_FIELDS = ("name", "out_dir")  # a resumed run stays where it is


# -- which run ----------------------------------------------------------------------------------
def run_of(path: str | Path) -> Path | None:
    """The run directory `path` belongs to (a run, or a checkpoint or weights file inside one), else None."""
    path = Path(path)
    if path.is_file() and path.name == MODEL_FILE:
        path = path.parent
    if path.parent.name == "checkpoints" and ((path / META_FILE).is_file() or (path / MODEL_FILE).is_file()):
        return path.parent.parent
    if (path / "checkpoints").is_dir():
        return path
    return None


def run_path_for(config: TrainConfig, resume: str | None, changes: Mapping[str, Any]) -> Path:
    """Where the run trains: RUN for ``resume=RUN`` (a run or a checkpoint in one), else out_dir/name.

    An --out-dir/--name given with ``--resume RUN`` that names another directory is refused: a
    resume never writes into another run."""
    named = Path(config.out_dir) / config.run_name()
    if resume in (None, "auto"):
        return named
    run = run_of(resume)
    if run is None:  # a checkpoint outside any run: a new run at out_dir/name starts from its state
        return named
    given = [f"--{key.replace('_', '-')}" for key in LOCATION_FIELDS if key in changes]
    if given and named.resolve() != run.resolve():
        raise SoftshareError(f"--resume {resume} continues the run {run} where it is, but {' and '.join(given)} "
                             f"name{'s' if len(given) == 1 else ''} {named}; drop {' and '.join(given)} (a resume "
                             f"never writes into another run)")
    return run


def saved_config(resume: str | None, preset: str | None, file_values: Mapping[str, Any],
                 overrides: Mapping[str, Any]) -> TrainConfig | None:
    """The config a resume will continue, read before the command line is resolved (so flags are
    checked against the run, not against the defaults of another task); None for a new run or
    when it cannot be found yet (the trainer then says why)."""
    if resume is None:
        return None
    if resume == "auto":
        given = {**(PRESETS.get(preset or "", {})), **file_values, **overrides}
        if not given.get("name"):
            return None  # the name comes from task, dataset and model: resolve those first
        path = Path(str(given.get("out_dir", TrainConfig.out_dir))) / str(given["name"])
    else:
        path = Path(resume)
    try:
        values = read_meta(_resume_source(path)).get("config")
        return apply_overrides(TrainConfig(), values, f"{path}") if isinstance(values, dict) else None
    except SoftshareError:
        return None


def _resume_source(path: Path) -> Path:
    """The checkpoint a resume of `path` reads: a run's last (its latest state), else what `path` names."""
    last = path / "checkpoints" / "last"
    return last if last.exists() else find_checkpoint(path)


def _checkpoint_to_resume(resume: str | None, run_path: Path):
    if resume is None:
        return None
    if resume == "auto":
        last = run_path / "checkpoints" / "last"
        return load_checkpoint(last) if last.exists() else None
    return load_checkpoint(_resume_source(Path(resume)))


# -- which settings -----------------------------------------------------------------------------
def _flag(key: str) -> str:
    return f"--{key.replace('_', '-')}"


def _resumed_config(config: TrainConfig, checkpoint, changes: dict[str, Any], world_size: int = 1,
                    preset: tuple[str, Mapping[str, Any]] | None = None) -> tuple[TrainConfig, dict]:
    """The saved config with the allowed `changes` applied, and {field: [old, new]} of those.

    `preset` (name, values) is the preset given with the resume: each of its values not
    overridden by `changes` must be the run's own, else the run was not trained with it."""
    saved_values = checkpoint.meta.get("config")
    if not saved_values:
        raise SoftshareError(f"checkpoint {checkpoint.path} records no training config (it was converted or "
                             f"folded, not saved by softshare train), so it cannot be resumed; start a new run")
    saved = apply_overrides(TrainConfig(), saved_values, f"checkpoint {checkpoint.path}")
    validate(saved)
    if preset is not None:
        _check_preset(saved, preset, changes, config, world_size)
    changes = _scaled_lr_change(config, saved, changes, world_size)
    changed, refused = {}, []
    for key, value in changes.items():
        old = getattr(saved, key)
        if key in LOCATION_FIELDS or value == old:
            continue
        if key in SAFE_ON_RESUME or key in RUNTIME_FIELDS:
            changed[key] = [old, value]
        else:
            refused.append(f"{_flag(key)} (run: {old!r}, asked: {value!r})")
    if refused:
        raise SoftshareError(f"cannot change {', '.join(refused)} when resuming: the checkpoint was trained with "
                             f"it; drop the flag, or start a new run with another --name (a resume may change "
                             f"only {', '.join(SAFE_ON_RESUME)}, and where it runs)")
    _check_epochs(saved, checkpoint, changed)
    resumed = apply_overrides(saved, {k: new for k, (_, new) in changed.items()}, "command line")
    validate(resumed)
    check_model(resumed)
    return resumed, changed


def _check_preset(saved: TrainConfig, preset: tuple[str, Mapping[str, Any]], changes: Mapping[str, Any],
                  config: TrainConfig, world_size: int) -> None:
    name, values = preset
    values = {**values, **body_defaults(saved, values)}  # what resolving it gave the run
    values = _scaled_lr_change(config, saved, {k: v for k, v in values.items() if k not in changes}, world_size)
    resolved = apply_overrides(TrainConfig(), {k: v for k, v in values.items() if k not in LOCATION_FIELDS},
                               f"preset {name}")
    keys = sorted((k for k in values if k not in LOCATION_FIELDS and getattr(resolved, k) != getattr(saved, k)),
                  key=lambda k: (k not in ("task", "model", "dataset"), k))
    differ = [f"{key} (run: {getattr(saved, key)!r}, preset: {getattr(resolved, key)!r})" for key in keys[:4]]
    if differ:
        more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
        raise SoftshareError(f"the run was not trained with --preset {name}: it differs in {', '.join(differ)}{more}; "
                             f"drop --preset (a resume keeps the run's saved config), or give the fields a "
                             f"resume may change as flags")


def _check_epochs(saved: TrainConfig, checkpoint, changed: dict) -> None:
    """Refuse an --epochs below what the run has already trained: it would train nothing and record
    a config that is not what happened."""
    state = checkpoint.train_state or {}
    done, partial = state.get("epoch"), state.get("batch")
    if "epochs" not in changed or not isinstance(done, int) or isinstance(done, bool):
        return
    needed = done + (1 if partial else 0)
    asked = changed["epochs"][1]
    if asked < needed:
        part = f" and part of epoch {done + 1}" if partial else ""
        raise SoftshareError(f"cannot set --epochs {asked}: {checkpoint.path} has already trained {done} "
                             f"epoch{'' if done == 1 else 's'}{part}; give --epochs {max(needed, 1)} or more to go "
                             f"on, or start a new run with another --name")


def _scaled_lr_change(config: TrainConfig, saved: TrainConfig, changes: Mapping[str, Any],
                      world_size: int) -> dict[str, Any]:
    """`changes` in the saved config's terms. A run records the lr it used (linear scaling done,
    lr_reference_batch 0); an lr asked for with a reference batch (the flag's, else the config's,
    e.g. an ImageNet preset's) is scaled the same way first, so repeating the command that
    started the run changes nothing and `--lr` means what it meant then."""
    changes = dict(changes)
    if "lr_reference_batch" not in changes and not ("lr" in changes and config.lr_reference_batch):
        return changes
    reference = changes.pop("lr_reference_batch", config.lr_reference_batch)
    if reference:
        changes["lr"] = changes.get("lr", config.lr) * saved.batch_size * world_size / reference
    return changes


# -- the training state -------------------------------------------------------------------------
@dataclass
class Restored:
    """Where a resumed run continues: `epoch` epochs done plus `batch` batches of the next."""

    epoch: int
    batch: int
    best: float | None
    best_epoch: int | None
    epoch_sums: torch.Tensor | None  # [loss*n, correct, n, penalty*n] of the part of the epoch done
    epoch_seconds: float | None  # time spent on that part (None: a checkpoint from before it was recorded)
    monitor: dict | None  # LossMonitor state
    data_fingerprint: str | None


def _check_train_state(state: Any, path: Path, batches_per_epoch: int | None = None) -> None:
    """Refuse a state.pt whose contents are not what `_save` writes, before any of it is used."""
    expected = {"epoch": int, "batch": int, "optimizer": dict, "rng_cpu": torch.Tensor}
    wrong = [key for key, kind in expected.items()
             if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool)]
    if not wrong and (state["epoch"] < 0 or state["batch"] < 0):
        wrong = ["epoch" if state["epoch"] < 0 else "batch"]
    if not wrong and batches_per_epoch is not None and state["batch"] >= max(batches_per_epoch, 1):
        wrong = [f"batch ({state['batch']:,}: an epoch of this run has {batches_per_epoch:,})"]
    if not wrong and not isinstance(state.get("epoch_sums", torch.zeros(3)), torch.Tensor):
        wrong = ["epoch_sums"]
    seconds = state.get("epoch_seconds")
    if not wrong and seconds is not None and (not isinstance(seconds, float) or not math.isfinite(seconds)
                                              or seconds < 0):
        wrong = ["epoch_seconds"]
    if wrong:
        raise SoftshareError(f"{path / 'state.pt'} does not hold the training state softshare writes (bad or missing "
                             f"{', '.join(wrong)}); restore it from a backup, or delete it and start a new run "
                             f"from scratch")


def _restore(checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
             ema: AveragedModel | None = None, batches_per_epoch: int | None = None) -> Restored:
    if checkpoint.train_state is None:
        raise SoftshareError(f"checkpoint {checkpoint.path} holds weights only (no optimizer state) and cannot "
                             f"be resumed; start a new run from it instead")
    state = checkpoint.train_state
    _check_train_state(state, checkpoint.path, batches_per_epoch)
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
    fingerprint = state.get("data_fingerprint")
    return Restored(state["epoch"], state["batch"], state.get("best_metric"), state.get("best_epoch"),
                    state.get("epoch_sums"), state.get("epoch_seconds"),
                    state["loss_monitor"] if isinstance(state.get("loss_monitor"), dict) else None,
                    fingerprint if isinstance(fingerprint, str) else None)


def check_same_data(restored: Restored, current: str, checkpoint_path: Path, changed: dict) -> None:
    """Refuse to continue on training data other than the run's (its fingerprint); a moved
    --data-root holding the same data is fine."""
    if restored.data_fingerprint is None or restored.data_fingerprint == current:
        return
    moved = changed.get("data_root")
    where = (f"--data-root {moved[1]} holds other data than {moved[0] or 'the generated/default data'} the run "
             f"trained on" if moved else "the data this run reads now differ from those it trained on")
    raise SoftshareError(f"cannot resume {checkpoint_path}: {where} (fingerprint {current}, run: "
                         f"{restored.data_fingerprint}); resume with the run's own data, or start a new run")
