"""The training loop, top to bottom: one process, one GPU, or torchrun DDP.

    python -m softshare train --preset fashion_mnist_cpu
    torchrun --nproc-per-node 4 -m softshare train --preset cifar10_swrn_28_10_2_cutout
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..analysis import recurrence_penalty
from ..analysis.lsm import record_lsm
from ..checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from ..device import resolve_device
from ..errors import SoftshareError
from ..layers import to_channels_last
from .algorithmic import AlgorithmicTask
from .classification import ClassificationTask
from .config import TrainConfig, apply_overrides
from .distributed import DistInfo, all_reduce_sum, any_rank, average_buffers, barrier, cleanup, init_distributed
from .optim import build_optimizer
from .run_dir import RunDir, local_device
from .task import Task

log = logging.getLogger("softshare.train")


class TrainingDiverged(SoftshareError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


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
    """The Task for ``config.task``: image classification, or mazes / prefix sums."""
    task_class = ClassificationTask if config.task == "classification" else AlgorithmicTask
    return task_class(config, device, dist)


def build_model(config: TrainConfig, task: Task, device: torch.device) -> nn.Module:
    """The task's model on `device`, in channels-last layout when `config.channels_last`."""
    model = task.build_model().to(device)
    if config.channels_last:
        to_channels_last(model)
    return model


def train_step(config: TrainConfig, task: Task, model: nn.Module, train_model: nn.Module,
               optimizer: torch.optim.Optimizer, batch, autocast_dtype: torch.dtype | None) -> tuple[float, object]:
    """One optimisation step on `batch`: the task's loss through `train_model` (`model` itself, or
    it compiled / DDP-wrapped), plus the recurrence penalty; backward, clipping, optimizer step.

    Returns (loss value, what the task counts as correct). A non-finite loss returns before the
    backward pass, leaving the weights as they were.
    """
    with torch.autocast(task.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss, correct = task.loss(train_model, batch)
        if config.recurrence_reg:
            loss = loss + config.recurrence_reg * recurrence_penalty(model)
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        return loss_value, correct
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    return loss_value, correct


def train(config: TrainConfig, resume: str | None = None, stop: StopFlag | None = None) -> TrainResult:
    """Train per `config`; `resume` is a run/checkpoint path or "auto" (this run's last checkpoint)."""
    dist = init_distributed(resolve_device(config.device).type)
    try:
        with stop or StopFlag() as stop_flag:
            return _train(config, resume, dist, stop_flag)
    finally:
        cleanup(dist)


def _train(config: TrainConfig, resume: str | None, dist: DistInfo, stop: StopFlag) -> TrainResult:
    run_path = Path(config.out_dir) / config.run_name()
    checkpoint = _checkpoint_to_resume(resume, run_path)
    if checkpoint is not None:  # the saved config wins; only the run length may be extended
        saved = apply_overrides(config, checkpoint.meta["config"], f"checkpoint {checkpoint.path}")
        config = apply_overrides(saved, {"epochs": config.epochs, "device": config.device}, "command line")
    elif dist.is_main and (run_path / "checkpoints").exists():
        raise SoftshareError(f"run directory {run_path} already holds a run; continue it with --resume auto, "
                             f"or pick another --name")

    device = local_device(config.device, dist.local_rank)
    seed_everything(config.seed, config.deterministic)
    task: Task = make_task(config, device, dist)
    model = build_model(config, task, device)
    optimizer = build_optimizer(config, model)
    autocast_dtype = amp_dtype(config, device)

    start_epoch, start_batch, best, epoch_sums = 0, 0, None, None
    if checkpoint is not None:
        start_epoch, start_batch, best, epoch_sums = _restore(checkpoint, model, optimizer, device)

    run = RunDir(run_path) if dist.is_main else None
    if run is not None:
        run.write_info(config.to_dict(), device, dist.world_size)
        task.save_artifacts(run.path)
        log.info("run %s: %s on %s, %d parameters, %d batches/epoch", run.path, config.model, device,
                 sum(p.numel() for p in model.parameters()), task.batches_per_epoch())
        if config.lsm_every and start_epoch == 0 and start_batch == 0:
            record_lsm(model, run.path, 0)  # the starting point; fails early for a model without banks
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
        # [sum of loss * n, correct, n] over this rank's batches of the epoch, on the host
        sums = epoch_sums if epoch_sums is not None else torch.zeros(3, dtype=torch.float64)
        epoch_sums, started = None, time.perf_counter()
        bar = tqdm(total=per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not (dist.is_main and sys.stderr.isatty()), leave=False, unit="batch")
        for index, batch in enumerate(task.train_batches(epoch, start_batch), start=start_batch):
            lr = learning_rate(config, epoch + index / per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            loss_value, correct = train_step(config, task, model, train_model, optimizer, batch, autocast_dtype)
            if not math.isfinite(loss_value):
                last = run_path / "checkpoints" / "last"
                raise TrainingDiverged(
                    f"loss became {loss_value} at epoch {epoch + 1}, step {index + 1}; the last good checkpoint "
                    f"is kept{f' at {last}' if last.exists() else ''}. Lower --lr or enable --grad-clip")
            n = task.batch_size_of(batch)
            sums += torch.tensor([loss_value * n, float(correct), float(n)], dtype=torch.float64)
            bar.update()
            loss_sum, correct_sum, count = sums.tolist()
            bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct_sum / count:.3f}",
                            img_s=f"{count * dist.world_size / (time.perf_counter() - started):.0f}")
            if any_rank(stop.requested, dist, device):
                bar.close()
                if run is not None:
                    _save(run, model, config, optimizer, epoch, index + 1, best, metrics, sums, "last")
                    log.info("stopped at epoch %d step %d; continue with --resume auto", epoch + 1, index + 1)
                return TrainResult(model, run_path if run else None, epoch, metrics, best, interrupted=True)
        bar.close()
        start_batch = 0
        seconds = time.perf_counter() - started

        average_buffers(model, dist)
        loss_sum, correct_sum, count = all_reduce_sum(sums.to(device), dist).tolist()
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / count, "train_acc": correct_sum / count,
                   "lr": learning_rate(config, epoch), "seconds": round(seconds, 2),
                   "images_per_s": round(count / seconds, 1)}
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            metrics.update(task.evaluate(model, autocast_dtype))
        improved = task.primary_metric in metrics and (best is None or metrics[task.primary_metric] > best)
        if improved:
            best = metrics[task.primary_metric]
        if run is not None:
            run.append_metrics(metrics, keep_epochs_below=epoch + 1)
            run.plot_curves()
            log.info("epoch %d/%d  %s", epoch + 1, config.epochs,
                     "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
            if (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs:
                _save(run, model, config, optimizer, epoch + 1, 0, best, metrics, None, "last")
            if improved:
                _save(run, model, config, optimizer, epoch + 1, 0, best, metrics, None, "best")
            if config.lsm_every and (epoch + 1) % config.lsm_every == 0:
                    record_lsm(model, run.path, epoch + 1)
        barrier(dist)
    if run is not None:
        run.close()
    return TrainResult(model, run_path if run else None, config.epochs, metrics, best)


def _checkpoint_to_resume(resume: str | None, run_path: Path):
    if resume is None:
        return None
    if resume == "auto":
        last = run_path / "checkpoints" / "last"
        return load_checkpoint(last) if last.exists() else None
    last = Path(resume) / "checkpoints" / "last"  # a run directory resumes from its latest state
    return load_checkpoint(last if last.exists() else find_checkpoint(resume))


def _restore(checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
    if checkpoint.train_state is None:
        raise SoftshareError(f"checkpoint {checkpoint.path} holds weights only (no optimizer state) and cannot "
                             f"be resumed; start a new run from it instead")
    try:
        model.load_state_dict(checkpoint.state_dict, strict=True)
    except RuntimeError as err:
        raise SoftshareError(f"checkpoint {checkpoint.path} does not fit this model: {str(err).splitlines()[0]}") from None
    state = checkpoint.train_state
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    sums = state.get("epoch_sums")
    log.info("resumed from %s at epoch %d, step %d", checkpoint.path, state["epoch"] + 1, state["batch"])
    return state["epoch"], state["batch"], state.get("best_metric"), sums


def _save(run: RunDir, model, config, optimizer, epoch: int, batch: int, best, metrics, sums, which: str) -> None:
    """Checkpoint at `epoch` completed epochs plus `batch` batches of the next one."""
    state = {"epoch": epoch, "batch": batch, "optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
             "best_metric": best}
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        state["rng_cuda"] = torch.cuda.get_rng_state()
    if sums is not None:
        state["epoch_sums"] = sums
    save_checkpoint(run.checkpoints / which, model, config=config.to_dict(), epoch=epoch, step=batch,
                    metrics=metrics, best_metric=best, train_state=state)
