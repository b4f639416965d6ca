"""The training loop, top to bottom: one process, one GPU, or torchrun DDP.

    python -m softshare train --preset fashion_mnist_cpu
    torchrun --nproc-per-node 4 -m softshare train --preset cifar10_swrn_28_10_2_cutout

`train(config)` trains a registered model on a built-in task; `softshare.fit` (train/fit.py)
any model on any data. Both run `run_training`: own the run directory, settle the config (a
resume keeps the run's own), build the task, model and optimizer, then train epoch after epoch
(`epoch.train_epoch`), evaluate, and save `best` and `last` (`checkpoints.py`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..analysis.lsm import record_lsm
from ..budget import TRAIN_BYTES_PER_PARAM, activation_bytes, build_skeleton, check_fits, memory_budget
from ..checkpoint import load
from ..data.imagefolder import IMAGEFOLDER
from ..device import resolve_device
from ..storage import crash_point
from ..layers import to_channels_last
from ..layers.structure import count_parameters
from ..progress import Progress
from .algorithmic import AlgorithmicTask, check_model
from .checkpoints import Position, as_key, primary, save_training_checkpoint
from .classification import ClassificationTask
from .config import TrainConfig, apply_overrides
from .config_help import CUSTOM
from .distributed import DistInfo, all_reduce_sum, average_buffers, barrier, cleanup, init_distributed
from .epoch import StopFlag, Training, recurrence_weight, step_backward, step_loss, train_epoch
from .imagefolder import ImageFolderTask
from .loggers import make_sinks
from .monitor import LossMonitor, TrainingDiverged, diverged
from .optim import build_optimizer, learning_rate, scale_lr
from .resume import _checkpoint_to_resume, _restore, _resumed_config, check_same_data, run_of, run_path_for
from .run_dir import RunDir, local_device, own_run_dir, read_metrics
from .task import Task

log = logging.getLogger("softshare.train")

__all__ = ["train", "run_training", "TrainResult", "make_task", "build_model", "amp_dtype", "seed_everything",
           "StopFlag", "TrainingDiverged", "step_loss", "step_backward", "recurrence_weight"]

TaskBuilder = Callable[[TrainConfig, torch.device, DistInfo], Task]
PROGRESS_EVERY_S = 30.0  # without a terminal: a progress line at most this often (rate, ETA, loss)


@dataclass
class TrainResult:
    model: nn.Module
    run_dir: Path | None
    epochs_done: int
    final_metrics: dict
    best_metric: float | None  # of the 'best' checkpoint, chosen on validation (None: no validation split)
    interrupted: bool = False
    best_epoch: int | None = None


def train(config: TrainConfig, resume: str | None = None, stop: StopFlag | None = None,
          changes: Mapping[str, Any] | None = None, overwrite: bool = False,
          preset: tuple[str, Mapping[str, Any]] | None = None) -> TrainResult:
    """Train a registered model on a built-in task per `config`; `resume` is a run/checkpoint path
    or "auto" (this run's last checkpoint).

    ``resume=RUN`` continues RUN where it lives; "auto" continues ``out_dir/name``. A resumed run
    keeps its saved config except for `changes` (the settings the caller asks for explicitly;
    default: `config`'s epochs and device): those in SAFE_ON_RESUME and where it runs apply,
    with a logged line and an entry in run_info.json; any other differing setting is refused,
    and so is a `preset` (name, values) the run was not trained with. `overwrite` starts afresh
    in a directory that holds an earlier run or other files (only a run's own entries there
    are replaced).
    """
    check_model(config)  # an unknown model or argument is refused before anything is written
    return run_training(config, make_task, resume=resume, stop=stop, changes=changes, overwrite=overwrite,
                        preset=preset)


def make_task(config: TrainConfig, device: torch.device, dist: DistInfo) -> Task:
    """The Task for ``config.task``: image classification (an ImageFolder streamed from disk, or a
    dataset held in memory), or mazes / prefix sums."""
    if config.task != "classification":
        task_class = AlgorithmicTask
    else:
        task_class = ImageFolderTask if config.dataset == IMAGEFOLDER else ClassificationTask
    return task_class(config, device, dist)


def run_training(config: TrainConfig, build_task: TaskBuilder, *, resume: str | None = None,
                 stop: StopFlag | None = None, changes: Mapping[str, Any] | None = None, overwrite: bool = False,
                 preset: tuple[str, Mapping[str, Any]] | None = None) -> TrainResult:
    """The one training loop: `build_task(config, device, dist)` says what is trained on what."""
    ranks = DistInfo.from_env()
    changes = dict(changes if changes is not None else {"epochs": config.epochs, "device": config.device})
    run_path = run_path_for(config, resume, changes)  # --resume RUN: RUN, wherever it lives
    continuing = resume == "auto" or (resume is not None and run_of(resume) is not None)
    with contextlib.ExitStack() as owned:
        if ranks.is_main:  # rank 0 alone writes the run directory, under its lock
            owned.enter_context(own_run_dir(run_path, continuing=continuing, overwrite=overwrite))
        stop_flag = owned.enter_context(stop or StopFlag())
        checkpoint = _checkpoint_to_resume(resume, run_path)
        changed: dict = {}
        if checkpoint is not None:
            config, changed = _resumed_config(config, checkpoint, changes, ranks.world_size, preset)
            config = apply_overrides(config, {"out_dir": str(run_path.parent), "name": run_path.name}, "run location")
            if _finished(checkpoint, config):
                log.info("%s has trained all %d epoch%s: nothing to do (give --epochs N above %d to train longer)",
                         run_path, config.epochs, "" if config.epochs == 1 else "s", config.epochs)
                state = checkpoint.train_state
                return TrainResult(load(checkpoint.path) if config.task != CUSTOM else None, run_path,
                                   config.epochs, checkpoint.meta.get("metrics") or {},
                                   primary(state.get("best_metric")), best_epoch=state.get("best_epoch"))
        elif resume is not None and ranks.is_main and (run_path / "config.json").exists():
            log.info("no checkpoint in %s yet: starting it from the beginning", run_path)
        if config.lr_reference_batch:  # linear scaling; the saved config records the lr used (resume: no rescale)
            config = scale_lr(config, ranks.world_size)
        device = local_device(resolve_device(config.device), ranks.local_rank)  # the one resolution of the device
        dist = init_distributed(device, ranks)
        try:
            return _train(config, build_task, checkpoint, changed, device, dist, stop_flag, run_path,
                          afresh=overwrite and checkpoint is None)
        finally:
            cleanup(dist)


def _finished(checkpoint, config: TrainConfig) -> bool:
    """Whether the checkpoint has trained all of `config.epochs` already (nothing left to do)."""
    state = checkpoint.train_state or {}
    return isinstance(state.get("epoch"), int) and state["epoch"] >= config.epochs and not state.get("batch")


def _train(config: TrainConfig, build_task: TaskBuilder, checkpoint, changed: dict, device: torch.device,
           dist: DistInfo, stop: StopFlag, run_path: Path, afresh: bool = False) -> TrainResult:
    seed_everything(config.seed, config.deterministic)
    task = build_task(config, device, dist)
    model = build_model(config, task, device)
    optimizer = build_optimizer(config, model)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
           if config.ema_decay else None)
    position = Position(data_fingerprint=task.data_fingerprint())
    if checkpoint is not None:
        restored = _restore(checkpoint, model, optimizer, device, ema, task.batches_per_epoch())
        check_same_data(restored, position.data_fingerprint, checkpoint.path, changed)
        if dist.is_main:
            read_metrics(run_path)  # a corrupt metrics.jsonl is refused now, before anything is written
        position = Position(restored.epoch, restored.batch, restored.best, restored.best_epoch, restored.epoch_sums,
                            LossMonitor(**restored.monitor) if restored.monitor else LossMonitor(),
                            restored.epoch_seconds, position.data_fingerprint)

    run = RunDir(run_path, afresh=afresh) if dist.is_main else None
    sinks = make_sinks(config.logger, run_path, config.to_dict()) if run is not None else []
    if run is not None:
        if checkpoint is not None:  # logged once train.log is attached, so the run's log has them too
            log.info("resumed from %s at epoch %d, step %d", checkpoint.path, position.epoch + 1, position.batch)
            for key, (old, new) in changed.items():
                log.info("resume: %s changed from %s to %s (from epoch %d, step %d)", key, old, new,
                         position.epoch + 1, position.batch)
        resumed = None if checkpoint is None else {"from": str(checkpoint.path), "epoch": position.epoch,
                                                   "step": position.batch, "changed": changed}
        run.write_info(config.to_dict(), device, dist.world_size, resumed)
        task.save_artifacts(run.path)
        log.info("run %s: %s on %s, %d parameters, %d batches/epoch", run.path, config.model, device,
                 count_parameters(model), task.batches_per_epoch())
        if task.evaluation_note():
            log.info("%s", task.evaluation_note())
        if config.lsm_every and position.epoch == 0 and position.batch == 0:
            record_lsm(model, run.path, 0, config.figure_format)  # the starting point; fails early for a model without banks
    barrier(dist)

    per_epoch = task.batches_per_epoch()
    progress = Progress(config.epochs * per_epoch, "training", unit="step", initial=position.epoch * per_epoch
                        + position.batch, log=log, enabled=dist.is_main, every_s=PROGRESS_EVERY_S, every_fraction=None)
    training = Training(config, task, model, _wrapped(model, config, task, device, dist), optimizer, ema, device,
                        dist, amp_dtype(config, device), position.monitor, stop, run_path, progress, sinks)
    metrics: dict = {}
    with contextlib.ExitStack() as closing:
        closing.callback(progress.close)
        for sink in sinks:
            closing.callback(sink.close)
        if run is not None:
            closing.callback(run.close)
        for epoch in range(position.epoch, config.epochs):
            # a run resumed mid-epoch: the examples and seconds of the part done before count with it
            # (checkpoints from before seconds were recorded: rates from this process's part only)
            done_before = float(position.epoch_sums[2]) if position.epoch_sums is not None else 0.0
            seconds_before = position.epoch_seconds if position.batch else 0.0
            outcome = train_epoch(training, epoch, position.batch, position.epoch_sums)
            if outcome.stopped_at is not None:  # a stop request: checkpoint mid-epoch, continue with resume
                position.epoch, position.batch, position.epoch_sums = epoch, outcome.stopped_at, outcome.sums
                position.epoch_seconds = (seconds_before or 0.0) + outcome.seconds
                if run is not None:
                    save_training_checkpoint(run, "last", model, config, optimizer, position, metrics, ema)
                    log.info("stopped at epoch %d step %d; continue with --resume auto", epoch + 1, outcome.stopped_at)
                return TrainResult(model, run_path if run else None, epoch, metrics, primary(position.best),
                                   interrupted=True, best_epoch=position.best_epoch)
            metrics = _end_of_epoch(training, epoch, outcome.sums, outcome.seconds, done_before, seconds_before)
            key = task.selection_key(metrics)
            improved = key is not None and (position.best is None or key >= as_key(position.best))  # ties: later
            position.epoch, position.batch, position.epoch_sums, position.epoch_seconds = epoch + 1, 0, None, None
            if improved:
                position.best, position.best_epoch = key, epoch + 1
            if run is not None:
                _record(run, training, metrics)
                # best before last: a crash in between leaves best newer than last, never older
                # than the best epoch last records (a resume from last redoes this epoch exactly)
                if improved:
                    save_training_checkpoint(run, "best", model, config, optimizer, position, metrics)
                crash_point("between-best-and-last")
                if (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs:
                    save_training_checkpoint(run, "last", model, config, optimizer, position, metrics, ema)
                if config.lsm_every and (epoch + 1) % config.lsm_every == 0:
                    record_lsm(model, run.path, epoch + 1, config.figure_format)
            barrier(dist)
    return TrainResult(model, run_path if run else None, config.epochs, metrics, primary(position.best),
                       best_epoch=position.best_epoch)


def _end_of_epoch(t: Training, epoch: int, sums: torch.Tensor, seconds: float, done_before: float = 0.0,
                  seconds_before: float | None = 0.0) -> dict:
    """The epoch's metrics over every rank (training sums, lr, speed, the task's evaluation), once
    the weights are checked to be finite. An epoch finished after a resume counts the part done
    before it: its `done_before` examples (this rank's) in `seconds_before` (None: not recorded,
    so the rate is of this process's part alone)."""
    config, task, model = t.config, t.task, t.model
    average_buffers(model, t.dist)
    loss_sum, correct_sum, count, penalty_sum = all_reduce_sum(sums.to(t.device), t.dist).tolist()
    counted = count if seconds_before is not None else count - done_before * t.dist.world_size
    seconds += seconds_before or 0.0
    metrics = {"epoch": epoch + 1, "train_loss": loss_sum / count,
               **({"train_acc": correct_sum / count} if task.counts_correct else {}),
               **({"train_recurrence_penalty": penalty_sum / count} if config.recurrence_reg else {}),
               "lr": learning_rate(config, epoch), "seconds": round(seconds, 2),
               f"{task.unit}_per_s": round(counted / seconds, 1)}
    if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
        metrics.update(task.evaluate(model, t.autocast))
        if t.ema is not None:
            metrics.update({f"ema_{k}": v for k, v in task.evaluate(t.ema.module, t.autocast).items()})
    metrics.update(task.epoch_metrics())
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise diverged("the weights became non-finite", epoch, task.batches_per_epoch() - 1, t.run_path, config)
    return metrics


def _record(run: RunDir, t: Training, metrics: dict) -> None:
    """The epoch's row in metrics.jsonl and every sink, the curves figure and the log line."""
    run.append_metrics(metrics, keep_epochs_below=metrics["epoch"])
    for sink in t.sinks:
        sink.write(run.read_metrics())
    run.plot_curves()
    log.info("epoch %d/%d  %s", metrics["epoch"], t.config.epochs,
             "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))


def build_model(config: TrainConfig, task: Task, device: torch.device) -> nn.Module:
    """The task's model on `device`, in channels-last layout when `config.channels_last`; first
    sized on the meta device: its parameters and a training step's activations must fit the
    device's memory budget (`budget`), so no flag can make it allocate more."""
    fix = "choose a smaller model (--model, --width, --depth, --model-args) or a smaller --batch-size"
    budget, _ = memory_budget(device)
    skeleton = build_skeleton(task.build_model, budget / TRAIN_BYTES_PER_PARAM, f"model {config.model}", fix)
    per_example, fixed = activation_bytes(skeleton, task.example_forward)
    params = count_parameters(skeleton)
    check_fits(TRAIN_BYTES_PER_PARAM * params + fixed + config.batch_size * per_example,
               f"training {config.model} ({params:,} parameters) at batch {config.batch_size}", fix, device)
    model = task.build_model().to(device)
    if config.channels_last:
        to_channels_last(model)
    return model


def _wrapped(model: nn.Module, config: TrainConfig, task: Task, device: torch.device, dist: DistInfo) -> nn.Module:
    """What the steps call: `model`, compiled if asked, in DDP under torchrun (its weights stay `model`'s)."""
    if config.compile:
        model = torch.compile(model)
    if dist.enabled:
        ddp_ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ddp_ids,
                                                    find_unused_parameters=task.find_unused_parameters)
    return model


def amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; off on CPU, where bf16 is emulated and ~4x slower."""
    if config.amp == "bf16" or (config.amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
