"""The training loop, top to bottom: one process, one GPU, or torchrun DDP.

    python -m softshare train --preset fashion_mnist_cpu
    torchrun --nproc-per-node 4 -m softshare train --preset cifar10_swrn_28_10_2_cutout
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import shutil
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..analysis import recurrence_penalty
from ..analysis.lsm import record_lsm
from ..checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from ..data.imagefolder import IMAGEFOLDER
from ..device import resolve_device
from ..errors import SoftshareError
from ..io import LOCK_FILE, crash_point, exclusive_lock, recover_leftovers
from ..layers import to_channels_last
from ..models.registry import check_model_args
from ..progress import Progress
from .algorithmic import AlgorithmicTask, resolve_model_name
from .classification import ClassificationTask
from .config import TrainConfig, apply_overrides, validate
from .distributed import DistInfo, all_reduce_sum, any_rank, average_buffers, barrier, cleanup, init_distributed
from .imagefolder import ImageFolderTask
from .loggers import make_sinks
from .optim import build_optimizer
from .run_dir import RunDir, local_device
from .task import Task

log = logging.getLogger("softshare.train")


class TrainingDiverged(SoftshareError):
    """The loss or gradients exploded; the message names the checkpoint kept (or "none yet")."""


# A step's loss this many times its running level (or the level where training started) is a
# spike; SPIKE_STEPS spikes in a row are an explosion (a net with clipped gradients recovers from a
# few bad steps: a width-32 prefix-sum net jumped from 0.07 to 11 for one step and went on to 100%),
# and a loss BLOWUP_FACTOR times the level is one at once.
EXPLOSION_FACTOR = 100.0
SPIKE_STEPS = 20
BLOWUP_FACTOR = 1e4
LEVEL_FLOOR = 0.1  # below this a loss counts as this much (converged losses are noisy ratios)
# The settings a resume may change: how long and how fast to train, how often to look. Anything
# else would make the checkpoint's state mean something different (model, data, optimizer...).
SAFE_ON_RESUME = ("epochs", "lr", "schedule", "lr_milestones", "lr_gamma", "warmup_epochs", "grad_clip",
                  "eval_every", "checkpoint_every", "lsm_every")
# Where and how the run executes, not what it computes: silently taken from the command line.
RUNTIME_FIELDS = ("device", "amp", "compile", "channels_last", "deterministic", "data_root", "download",
                  "name", "out_dir", "workers", "logger", "figure_format")


@dataclass
class LossMonitor:
    """Running level of the training loss; says when a step's loss means training exploded."""

    level: float | None = None  # exponential moving average of recent losses (spikes left out)
    start: float | None = None  # the level after the first steps of the run
    steps: int = 0
    spikes: int = 0  # spikes in a row up to the last update

    def _ratio(self, loss: float) -> tuple[float, str] | None:
        """How far `loss` is above the worse-placed reference, and the reference's description."""
        ratios = []
        if self.level is not None:
            ratios.append((loss / max(self.level, LEVEL_FLOOR), f"its running level {self.level:.3g}"))
        if self.start is not None:
            ratios.append((loss / (10 * max(self.start, LEVEL_FLOOR)), f"where training started ({self.start:.3g})"))
        return max(ratios, key=lambda r: r[0]) if ratios else None

    def problem(self, loss: float) -> str | None:
        """Why `loss` means divergence, or None."""
        if not math.isfinite(loss):
            return f"the loss became {loss}"
        ratio = self._ratio(loss)
        if ratio is None or ratio[0] <= EXPLOSION_FACTOR:
            return None
        if ratio[0] > BLOWUP_FACTOR:
            return f"the loss {loss:.3g} is far above {ratio[1]}"
        if self.spikes + 1 >= SPIKE_STEPS:
            return f"the loss {loss:.3g} stayed far above {ratio[1]} for {SPIKE_STEPS} steps"
        return None

    def update(self, loss: float) -> None:
        ratio = self._ratio(loss)
        if ratio is not None and ratio[0] > EXPLOSION_FACTOR:
            self.spikes += 1  # a spike does not move the level it is judged against
        else:
            self.spikes = 0
            self.level = loss if self.level is None else 0.9 * self.level + 0.1 * loss
        self.steps += 1
        if self.steps == 10:
            self.start = self.level

    def state(self) -> dict:
        return {"level": self.level, "start": self.start, "steps": self.steps, "spikes": self.spikes}


@dataclass
class TrainResult:
    model: nn.Module
    run_dir: Path | None
    epochs_done: int
    final_metrics: dict
    best_metric: float | None
    interrupted: bool = False


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


class StopFlag:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop at the next step; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.info("signal %s received: saving a checkpoint and stopping after this step", signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def make_task(config: TrainConfig, device: torch.device, dist: DistInfo) -> Task:
    """The Task for ``config.task``: image classification (an ImageFolder streamed from disk, or a
    dataset held in memory), or mazes / prefix sums."""
    if config.task != "classification":
        task_class = AlgorithmicTask
    else:
        task_class = ImageFolderTask if config.dataset == IMAGEFOLDER else ClassificationTask
    return task_class(config, device, dist)


def build_model(config: TrainConfig, task: Task, device: torch.device) -> nn.Module:
    """The task's model on `device`, in channels-last layout when `config.channels_last`."""
    model = task.build_model().to(device)
    if config.channels_last:
        to_channels_last(model)
    return model


def recurrence_weight(config: TrainConfig, epoch: float) -> float:
    """The recurrence penalty's weight at (fractional) `epoch`: `recurrence_reg`, or with
    `recurrence_reg_anneal` > 0 falling linearly to 0 at that epoch (a pull into recurrence that
    the net is then free to leave)."""
    if not config.recurrence_reg_anneal:
        return config.recurrence_reg
    return config.recurrence_reg * max(0.0, 1.0 - epoch / config.recurrence_reg_anneal)


def step_loss(config: TrainConfig, task: Task, model: nn.Module, train_model: nn.Module, batch,
              autocast_dtype: torch.dtype | None, reg_weight: float | None = None) -> tuple[torch.Tensor, float, float, object]:
    """The loss one step minimises: the task's loss through `train_model` (`model` itself, or it
    compiled / DDP-wrapped) plus the recurrence penalty weighted by `reg_weight` (default
    `config.recurrence_reg`). Returns (loss to backpropagate, task loss value, penalty value, what
    the task counts as correct)."""
    reg_weight = config.recurrence_reg if reg_weight is None else reg_weight
    with torch.autocast(task.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss, correct = task.loss(train_model, batch)
        penalty = recurrence_penalty(model) if config.recurrence_reg else None
    loss_value = loss.item()  # the task loss alone: comparable with the validation loss
    penalty_value = penalty.item() if penalty is not None else 0.0
    if penalty is not None and reg_weight:
        loss = loss + reg_weight * penalty
    return loss, loss_value, penalty_value, correct


def step_backward(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """Gradients of `loss`, clipped when set; returns their norm (the caller checks it, then steps)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = (nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip) if config.grad_clip
            else nn.utils.get_total_norm(grads))
    return float(norm)


def train(config: TrainConfig, resume: str | None = None, stop: StopFlag | None = None,
          changes: Mapping[str, Any] | None = None) -> TrainResult:
    """Train per `config`; `resume` is a run/checkpoint path or "auto" (this run's last checkpoint).

    A resumed run keeps its saved config except for `changes` (the settings the caller asks
    for explicitly; default: `config`'s epochs and device): those in SAFE_ON_RESUME apply, with
    a logged line and an entry in run_info.json; any other differing setting is refused.
    """
    check_model(config)
    dist = init_distributed(resolve_device(config.device).type)
    if changes is None:
        changes = {"epochs": config.epochs, "device": config.device}
    try:
        with stop or StopFlag() as stop_flag:
            return _train(config, resume, dist, stop_flag, dict(changes))
    finally:
        cleanup(dist)


def check_model(config: TrainConfig) -> None:
    """Refuse an unknown or absurd model name and unknown --model-args keys, before any work."""
    model = config.model if config.task == "classification" else resolve_model_name(config.task, config.model)
    check_model_args(model, config.model_args)


@contextlib.contextmanager
def _own_run_dir(run_path: Path) -> Iterator[None]:
    """Create/lock `run_path` for the whole run and finish what a killed writer left there.

    Refuses a directory that is not a run (nothing of the user's is ever written into), and
    removes the directory again if it was created here and the run failed before writing.
    """
    if run_path.exists() and not run_path.is_dir():
        raise SoftshareError(f"cannot write run directory {run_path}: it is a file; choose another --name "
                             f"or --out-dir")
    if run_path.is_dir() and not _is_run_dir(run_path) and any(run_path.iterdir()):
        raise SoftshareError(f"refusing to train into {run_path}: it exists and is not a softshare run "
                             f"directory; choose another --name or --out-dir")
    created = not run_path.exists()
    try:
        run_path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SoftshareError(f"cannot write run directory {run_path}: {err.strerror}; "
                             f"choose another --out-dir or fix its permissions") from None
    try:
        with exclusive_lock(run_path, "run directory", "wait for it to finish or stop it; one process "
                                                       "trains a run at a time"):
            for folder in (run_path, run_path / "checkpoints", run_path / "lsm"):
                for done in recover_leftovers(folder):
                    log.info("%s", done)
            yield
    finally:
        if created and [p.name for p in run_path.iterdir()] == [LOCK_FILE]:
            shutil.rmtree(run_path, ignore_errors=True)  # failed before writing anything


def _is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in ("config.json", "checkpoints", "metrics.jsonl", LOCK_FILE))


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


def _train(config: TrainConfig, resume: str | None, dist: DistInfo, stop: StopFlag,
           changes: dict[str, Any]) -> TrainResult:
    run_path = Path(config.out_dir) / config.run_name()
    with contextlib.ExitStack() as owned:
        if dist.is_main:
            owned.enter_context(_own_run_dir(run_path))
        return _train_locked(config, resume, dist, stop, changes, run_path)


def _train_locked(config: TrainConfig, resume: str | None, dist: DistInfo, stop: StopFlag,
                  changes: dict[str, Any], run_path: Path) -> TrainResult:
    checkpoint = _checkpoint_to_resume(resume, run_path)
    changed: dict = {}
    if checkpoint is not None:
        config, changed = _resumed_config(config, checkpoint, changes, dist.world_size)
    elif dist.is_main and (run_path / "config.json").exists():
        if resume is None:
            raise SoftshareError(f"run directory {run_path} already holds a run; continue it with --resume auto, "
                                 f"or pick another --name")
        log.info("no checkpoint in %s yet: starting it from the beginning", run_path)

    if config.lr_reference_batch:  # linear scaling; the saved config records the lr used (resume: no rescale)
        config = scale_lr(config, dist.world_size)
    device = local_device(config.device, dist.local_rank)
    seed_everything(config.seed, config.deterministic)
    task: Task = make_task(config, device, dist)
    model = build_model(config, task, device)
    optimizer = build_optimizer(config, model)
    autocast_dtype = amp_dtype(config, device)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
           if config.ema_decay else None)

    start_epoch, start_batch, best, best_epoch, epoch_sums, monitor = 0, 0, None, None, None, LossMonitor()
    if checkpoint is not None:
        start_epoch, start_batch, best, best_epoch, epoch_sums, monitor = _restore(checkpoint, model, optimizer,
                                                                                    device, ema)
        for key, (old, new) in changed.items():
            log.info("resume: %s changed from %s to %s (from epoch %d, step %d)", key, old, new,
                     start_epoch + 1, start_batch)

    run = RunDir(run_path) if dist.is_main else None
    sinks = make_sinks(config.logger, run_path, config.to_dict()) if run is not None else []
    if run is not None:
        resumed = None if checkpoint is None else {"from": str(checkpoint.path), "epoch": start_epoch,
                                                   "step": start_batch, "changed": changed}
        run.write_info(config.to_dict(), device, dist.world_size, resumed)
        task.save_artifacts(run.path)
        log.info("run %s: %s on %s, %d parameters, %d batches/epoch", run.path, config.model, device,
                 sum(p.numel() for p in model.parameters()), task.batches_per_epoch())
        if config.lsm_every and start_epoch == 0 and start_batch == 0:
            record_lsm(model, run.path, 0, config.figure_format)  # the starting point; fails early for a model without banks
    barrier(dist)

    train_model: nn.Module = model
    if config.compile:
        train_model = torch.compile(train_model)
    if dist.enabled:
        ddp_ids = [device.index] if device.type == "cuda" else None
        # the progressive loss runs only some blocks in a step: DDP must expect unused parameters
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=ddp_ids,
                                                          find_unused_parameters=config.alpha > 0)

    per_epoch = task.batches_per_epoch()
    metrics: dict = {}
    for epoch in range(start_epoch, config.epochs):
        model.train()
        # [sum of task loss * n, correct, n, sum of recurrence penalty * n] over this rank's
        # batches of the epoch, on the host (checkpoints before the penalty column hold 3)
        sums = torch.zeros(4, dtype=torch.float64)
        if epoch_sums is not None:
            sums[:len(epoch_sums)] = epoch_sums
        epoch_sums, started = None, time.perf_counter()
        bar = Progress(per_epoch, f"epoch {epoch + 1}/{config.epochs}", unit="batch", initial=start_batch,
                       log=log, enabled=dist.is_main)
        for index, batch in enumerate(task.train_batches(epoch, start_batch), start=start_batch):
            lr = learning_rate(config, epoch + index / per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            reg_weight = recurrence_weight(config, epoch + index / per_epoch)
            loss, loss_value, penalty_value, correct = step_loss(config, task, model, train_model, batch, autocast_dtype,
                                                                 reg_weight)
            total_value = loss_value + reg_weight * penalty_value  # what the step minimises
            problem = monitor.problem(total_value)
            if any_rank(problem is not None, dist, device):
                raise _diverged(problem or "the loss exploded on another rank", epoch, index, run_path, config)
            norm = step_backward(config, model, optimizer, loss)
            if any_rank(not math.isfinite(norm), dist, device):
                raise _diverged(f"the gradient norm became {norm}", epoch, index, run_path, config)
            optimizer.step()
            if ema is not None:
                ema.update_parameters(model)
            monitor.update(total_value)
            n = task.batch_size_of(batch)
            sums += torch.tensor([loss_value * n, float(correct), float(n), penalty_value * n], dtype=torch.float64)
            loss_sum, correct_sum, count, _ = sums.tolist()
            bar.set(loss=f"{loss_sum / count:.3f}", acc=f"{correct_sum / count:.3f}",
                    img_s=f"{count * dist.world_size / (time.perf_counter() - started):.0f}")
            bar.update()
            if any_rank(stop.requested, dist, device):
                bar.close()
                for sink in sinks:
                    sink.close()
                if run is not None:
                    _save(run, model, config, optimizer, epoch, index + 1, best, best_epoch, monitor, metrics, sums,
                          "last", ema)
                    log.info("stopped at epoch %d step %d; continue with --resume auto", epoch + 1, index + 1)
                return TrainResult(model, run_path if run else None, epoch, metrics, _primary(best), interrupted=True)
        bar.close()
        start_batch = 0
        seconds = time.perf_counter() - started

        average_buffers(model, dist)
        loss_sum, correct_sum, count, penalty_sum = all_reduce_sum(sums.to(device), dist).tolist()
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / count, "train_acc": correct_sum / count,
                   **({"train_recurrence_penalty": penalty_sum / count} if config.recurrence_reg else {}),
                   "lr": learning_rate(config, epoch), "seconds": round(seconds, 2),
                   "images_per_s": round(count / seconds, 1)}
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            metrics.update(task.evaluate(model, autocast_dtype))
            if ema is not None:
                metrics.update({f"ema_{k}": v for k, v in task.evaluate(ema.module, autocast_dtype).items()})
        metrics.update(task.epoch_metrics())
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise _diverged("the weights became non-finite", epoch, per_epoch - 1, run_path, config)
        key = task.selection_key(metrics)
        improved = key is not None and (best is None or key >= _as_key(best))  # ties: the later epoch
        if improved:
            best, best_epoch = key, epoch + 1
        if run is not None:
            run.append_metrics(metrics, keep_epochs_below=epoch + 1)
            for sink in sinks:
                sink.write(run.read_metrics())
            run.plot_curves(getattr(task, "eval_split", None) or ("test" if config.val_size == 0 else "validation"))
            log.info("epoch %d/%d  %s", epoch + 1, config.epochs,
                     "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
            # best before last: a crash in between leaves best newer than last, never older
            # than the best epoch last records (a resume from last redoes this epoch exactly)
            save = functools.partial(_save, run, model, config, optimizer, epoch + 1, 0, best, best_epoch, monitor,
                                     metrics, None)
            if improved:
                save("best")
            crash_point("between-best-and-last")
            if (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs:
                save("last", ema)
            if config.lsm_every and (epoch + 1) % config.lsm_every == 0:
                    record_lsm(model, run.path, epoch + 1, config.figure_format)
        barrier(dist)
    for sink in sinks:
        sink.close()
    if run is not None:
        run.close()
    return TrainResult(model, run_path if run else None, config.epochs, metrics, _primary(best))


def _as_key(best: float | list[float]) -> list[float]:
    """A recorded best as a selection key (runs before selection keys recorded one number)."""
    return list(best) if isinstance(best, (list, tuple)) else [best]


def _primary(best: float | list[float] | None) -> float | None:
    """The primary metric of a selection key (what results and checkpoint metadata report)."""
    return None if best is None else _as_key(best)[0]


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
    monitor = LossMonitor(**state["loss_monitor"]) if isinstance(state.get("loss_monitor"), dict) else LossMonitor()
    log.info("resumed from %s at epoch %d, step %d", checkpoint.path, state["epoch"] + 1, state["batch"])
    return state["epoch"], state["batch"], state.get("best_metric"), state.get("best_epoch"), sums, monitor


def _diverged(problem: str, epoch: int, index: int, run_path: Path, config: TrainConfig) -> TrainingDiverged:
    """The one-line stop message: where it happened and the checkpoint actually kept."""
    last = run_path / "checkpoints" / "last"
    clip = f" or with a tighter --grad-clip than {config.grad_clip:g}" if config.grad_clip else " or with --grad-clip 1"
    try:
        meta = json.loads((last / "meta.json").read_text())
        kept = f"kept: {last} (epoch {meta['epoch']}, step {meta['step']})"
        advice = (f"continue from it with a lower learning rate (the same command with --resume auto "
                  f"--lr {config.lr / 10:g}){clip}")
    except (OSError, ValueError, KeyError, TypeError):
        kept = "kept: none yet (no checkpoint was written before it diverged)"
        advice = f"start again with a lower learning rate (--lr {config.lr / 10:g}){clip}"
    return TrainingDiverged(f"training diverged at epoch {epoch + 1}, step {index + 1}: {problem}; checkpoint "
                            f"{kept}; {advice}")


def _save(run: RunDir, model, config, optimizer, epoch: int, batch: int, best, best_epoch, monitor: LossMonitor,
          metrics, sums, which: str, ema: AveragedModel | None = None) -> None:
    """Checkpoint at `epoch` completed epochs plus `batch` batches of the next one; with `ema`,
    its state goes into the training state and its weights into checkpoints/ema."""
    state = {"epoch": epoch, "batch": batch, "optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
             "best_metric": best, "best_epoch": best_epoch, "loss_monitor": monitor.state()}
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        state["rng_cuda"] = torch.cuda.get_rng_state()
    if sums is not None:
        state["epoch_sums"] = sums
    if ema is not None:
        state["ema"] = ema.state_dict()
        save_checkpoint(run.checkpoints / "ema", ema.module, config=config.to_dict(), epoch=epoch, step=batch,
                        metrics={k: v for k, v in metrics.items() if k.startswith("ema_")})
    save_checkpoint(run.checkpoints / which, model, config=config.to_dict(), epoch=epoch, step=batch,
                    metrics=metrics, best_metric=_primary(best), train_state=state)
