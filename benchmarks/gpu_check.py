"""The GPU check: softshare's CUDA paths proven in one unattended run that fits a short device lease.

    python benchmarks/gpu_check.py --out DIR             # on a CUDA machine: about 8 minutes at most
    python benchmarks/gpu_check.py --out DIR --dry-run   # CPU, tiny sizes, under a minute (tests the report)

Writes ``DIR/gpu-report.json`` and ``DIR/gpu-report.md`` (plus ``DIR/logs/<part>.log`` and the
parts' scratch runs under ``DIR/work``). Each part runs in its own process group with its own time
cap, inside a total budget; a part that fails or runs out of time is recorded, never fatal. The
parts (see docs/gpu.md for what each covers and what it does not):

  env             hardware, versions, the chip's dense bf16 peak
  tests           `pytest -m device --device cuda`: the tests that take the `device` fixture (tests/conftest.py)
  speed_eager     training images/s of WRN-28-10 vs SWRN-28-10-2 / -6, batch 128, bf16 + channels-last
  speed_compiled  the same under torch.compile
  cifar_sanity    the paper's CIFAR recipe on synthetic data: the loss falls
  algo_speed      training steps/s of the prefix_sums_gpu and mazes_gpu presets
  ddp             2 processes, gloo backend, one GPU, through `softshare.train`
  prefix_learn    a fixed number of prefix_sums_gpu steps (~2 min): the exact match reached
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and str(REPO / "src") not in sys.path:  # a checkout without softshare installed
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.distributed as torch_dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import softshare  # noqa: E402
from softshare.data import BatchLoader  # noqa: E402
from softshare.train.config import TrainConfig, resolve_config  # noqa: E402
from softshare.train.distributed import DistInfo  # noqa: E402
from softshare.train.loop import amp_dtype, make_task, train  # noqa: E402
from softshare.train.optim import build_optimizer, learning_rate  # noqa: E402

REPORT_JSON, REPORT_MD = "gpu-report.json", "gpu-report.md"
FORMAT = "softshare-gpu-report"
TOTAL_BUDGET_S = 470.0  # the whole script on one H100/H200: 8 minutes, with a margin for start-up
DRY_BUDGET_S = 1200.0  # --dry-run checks the plumbing on a CPU that may be busy: time is not what it tests
CIFAR_TRAIN_IMAGES, RECIPE_EPOCHS = 50_000, 200  # CIFAR-10/100 training set, the paper's schedule
TARGET_RATIO, TARGET_RECIPE_MIN = 0.97, 30.0

# Dense (no sparsity) bf16 tensor-core peaks from the vendor data sheets, TFLOP/s. Matched on
# torch.cuda.get_device_name(); anything else reports null rather than a guess.
BF16_PEAK_TFLOPS = [  # (substrings that must all appear, substrings that must not, peak)
    (("H200",), (), 989.4),
    (("H100",), ("PCIe", "NVL"), 989.4),  # SXM: "NVIDIA H100 80GB HBM3"
    (("A100",), (), 312.0),
]


def bf16_peak_tflops(device_name: str) -> float | None:
    """The chip's dense bf16 peak, or None when it is not in the table (no guessing)."""
    for must, must_not, peak in BF16_PEAK_TFLOPS:
        if all(m in device_name for m in must) and not any(m in device_name for m in must_not):
            return peak
    return None


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    cap_s: float  # on a GPU
    dry_cap_s: float  # in --dry-run on CPU
    floor_s: float = 15.0  # kept free for this part while earlier parts run


PARTS = [
    Part("env", "Environment", 45, 240),
    Part("tests", "Device tests (pytest -m device --device cuda)", 100, 240),
    Part("speed_eager", "Training speed, eager", 60, 240),
    Part("speed_compiled", "Training speed, torch.compile", 150, 240, floor_s=30),
    Part("cifar_sanity", "CIFAR recipe on synthetic data", 45, 240),
    Part("algo_speed", "Algorithmic presets: steps/s", 45, 240),
    Part("ddp", "DDP: 2 processes, gloo, one GPU", 60, 240),
    Part("prefix_learn", "prefix_sums_gpu: exact match after a fixed number of steps", 130, 240, floor_s=30),
]
PART_NAMES = [p.name for p in PARTS]


# ================================================================================================
# Part workers: each runs in its own process (python gpu_check.py --run-part NAME ...)
# ================================================================================================
@dataclass
class Context:
    dry_run: bool
    work: Path
    result_path: Path
    deadline: float  # time.time() by which the part must be done

    def remaining(self) -> float:
        return self.deadline - time.time()

    def save(self, data: dict) -> None:
        """Write (partial) results now: what is saved survives the part being killed at its cap."""
        tmp = self.result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(self.result_path)

    @property
    def device(self):
        return torch.device("cpu" if self.dry_run else "cuda")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _timer(device) -> Iterator[list[float]]:
    """Seconds of the enclosed GPU work (CUDA events) or wall clock on the CPU; read after exit."""
    out: list[float] = []
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield out
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1000.0)
    else:
        begin = time.perf_counter()
        yield out
        out.append(time.perf_counter() - begin)


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=REPO, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def part_env(ctx: Context) -> dict:
    """Hardware and versions: the provenance of every figure in the report."""
    data: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "softshare": softshare.__version__, "git_commit": git_commit(),
        "dry_run": ctx.dry_run, "cpu_count": os.cpu_count(),
    }
    device = ctx.device
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        data.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported(),
                    bf16_peak_tflops=bf16_peak_tflops(props.name))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            data["driver"] = smi.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            data["driver"] = None
    else:
        data.update(device=f"cpu ({platform.machine()})", torch_threads=torch.get_num_threads(),
                    bf16_peak_tflops=None)
    return data


def part_tests(ctx: Context) -> dict:
    """The device-parametrised tests on the device; counts and the names of failures from JUnit XML."""
    device = ctx.device
    xml = ctx.work / "junit.xml"
    # every device test, the slow-marked ones too: they are slow on a CPU (bf16 is emulated), not on a GPU
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "device",
           "--device", str(device), f"--junitxml={xml}", "--timeout", "300", str(REPO / "tests")]
    if ctx.dry_run:  # the plumbing only: the suite itself runs these tests on CPU anyway
        cmd += ["-k", "test_shared_conv_on_device_matches_conv_on_mixed_weight and fp32"]
    started = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              timeout=max(ctx.remaining() - 5, 1), env=_child_env())
        output, returncode = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output, returncode = f"pytest timed out: {err}", None
    print(output[-20000:])
    data: dict[str, Any] = {"command": " ".join(cmd[1:]), "returncode": returncode,
                            "seconds": round(time.time() - started, 1)}
    if xml.exists():
        root = ElementTree.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
        data.update(counts, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                    failed=failed)
    data["ok"] = returncode == 0 and data.get("tests", 0) > 0 and not data.get("failed")
    return data


# -- speed ----------------------------------------------------------------------------------------
SPEED = {  # (plain, shared..., batch, warm-up steps, rounds, steps per round)
    "gpu": (("wrn_28_10", "swrn_28_10_2", "swrn_28_10_6"), 128, 3, 7, 8),
    "dry": (("wrn_16_1", "swrn_16_1_2", "swrn_16_1_6"), 4, 1, 3, 2),
}


class SpeedTrainer:
    """One model training on a fixed synthetic CIFAR batch exactly as `softshare train` would on
    CUDA (bf16 autocast, channels-last, fused SGD of the paper's recipe)."""

    def __init__(self, name: str, batch: int, device, compiled: bool, dry_run: bool) -> None:
        torch.manual_seed(0)
        self.name, self.batch, self.device = name, batch, device
        self.model = softshare.to_channels_last(softshare.create_model(name, num_classes=10).to(device)).train()
        self.optimizer = build_optimizer(TrainConfig(), self.model)
        # dry run: dynamo's tracing without inductor's minute-long C++ build on a CPU
        self.forward = (torch.compile(self.model, backend="eager" if dry_run else "inductor")
                        if compiled else self.model)
        self.x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, 10, (batch,), device=device)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(self.forward(self.x).float(), self.y)
        loss.backward()
        self.optimizer.step()

    def flops_per_step(self) -> int:
        """FLOPs of one forward + backward (FlopCounterMode counts matmuls and convolutions,
        the bank's mixing GEMMs included; the optimizer's elementwise work is not counted)."""
        self.optimizer.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as counter:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(self.model(self.x).float(), self.y)
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())


def _speed(ctx: Context, compiled: bool) -> dict:
    """Interleaved timing: every round steps each model in turn (order reversed every other round),
    so drift of the machine (clocks, temperature) hits all models alike; medians over rounds."""
    device = ctx.device
    names, batch, warmup, rounds, steps = SPEED["dry" if ctx.dry_run else "gpu"]
    peak = None
    if device.type == "cuda":
        peak = bf16_peak_tflops(torch.cuda.get_device_name(device))
        torch.backends.cudnn.benchmark = True  # what `softshare train` uses on CUDA (deterministic off)
    data: dict[str, Any] = {"compiled": compiled, "batch": batch, "warmup_steps": warmup, "rounds": rounds,
                            "steps_per_round": steps, "plain": names[0], "recipe_model": names[1], "precision": "bf16 autocast",
                            "memory_format": "channels_last", "bf16_peak_tflops": peak, "models": {}}
    trainers = []
    for name in names:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            baseline = torch.cuda.memory_allocated(device)
        started = time.perf_counter()
        trainer = SpeedTrainer(name, batch, device, compiled, ctx.dry_run)
        flops = trainer.flops_per_step()
        for _ in range(warmup):  # the first compiled step compiles
            trainer.step()
        _sync(device)
        entry: dict[str, Any] = {"parameters": sum(p.numel() for p in trainer.model.parameters()),
                                 "flops_per_step": flops, "warmup_s": round(time.perf_counter() - started, 2),
                                 "round_images_per_s": []}
        if device.type == "cuda":  # the model's parameters, gradients, momentum and activations
            entry["peak_memory_gib"] = round((torch.cuda.max_memory_allocated(device) - baseline) / 2**30, 3)
        else:
            entry["peak_memory_gib"] = None
        data["models"][name] = entry
        trainers.append(trainer)
        ctx.save(data)
    for r in range(rounds):
        for trainer in (trainers if r % 2 == 0 else trainers[::-1]):
            with _timer(device) as seconds:
                for _ in range(steps):
                    trainer.step()
            data["models"][trainer.name]["round_images_per_s"].append(batch * steps / seconds[0])
        ctx.save(data)
    plain = data["models"][names[0]]["round_images_per_s"]
    for name, entry in data["models"].items():
        ips = statistics.median(entry["round_images_per_s"])
        tflops = entry["flops_per_step"] * ips / batch / 1e12
        entry.update(images_per_s=round(ips, 3), tflops=round(tflops, 6),
                     fraction_of_peak=None if peak is None else round(tflops / peak, 4),
                     projected_recipe_min=round(RECIPE_EPOCHS * CIFAR_TRAIN_IMAGES / ips / 60, 2))
        entry["round_images_per_s"] = [round(v, 1) for v in entry["round_images_per_s"]]
        if name != names[0]:
            entry["ratio_to_plain"] = round(statistics.median(
                [s / p for s, p in zip(entry["round_images_per_s"], plain)]), 4)
    return data


def part_speed_eager(ctx: Context) -> dict:
    return _speed(ctx, compiled=False)


def part_speed_compiled(ctx: Context) -> dict:
    return _speed(ctx, compiled=True)


# -- the CIFAR recipe on synthetic data -------------------------------------------------------------
def synthetic_cifar(count: int, seed: int = 0):
    """uint8 32x32 images whose class is the mean colour (plus noise): learnable through the
    recipe's crop, flip and Cutout, so a falling loss means the training path works."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randint(40, 216, (10, 3, 1, 1), generator=g).float()
    labels = torch.randint(0, 10, (count,), generator=g)
    noise = torch.randn(count, 3, 32, 32, generator=g) * 30
    return (colours[labels] + noise).clamp(0, 255).to(torch.uint8), labels


def part_cifar_sanity(ctx: Context) -> dict:
    """`cifar10_swrn_28_10_2_cutout`'s model, optimizer, schedule, augmentation and precision
    (`softshare train`'s own builders) on synthetic images; the loss falls."""
    device = ctx.device
    model_name, batch, steps = ("swrn_16_1_2", 32, 40) if ctx.dry_run else ("swrn_28_10_2", 128, 100)
    config = resolve_config("cifar10_swrn_28_10_2_cutout", overrides={"model": model_name, "batch_size": batch})
    torch.manual_seed(config.seed)

    model = softshare.to_channels_last(softshare.create_model(model_name, num_classes=10).to(device)).train()
    optimizer = build_optimizer(config, model)
    dtype = amp_dtype(config, device)
    images, labels = synthetic_cifar(batch * 20)
    loader = BatchLoader(images, labels, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), batch_size=batch,
                         shuffle=True, drop_last=True, crop_padding=config.crop_padding, flip=config.flip,
                         cutout=config.cutout, channels_last=True, device=device, seed=config.seed)
    per_epoch, losses, started = len(loader), [], time.perf_counter()
    epoch = 0
    while len(losses) < steps:
        for index, (x, y) in enumerate(loader.iterate(epoch)):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, epoch + index / per_epoch)
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = F.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) >= steps:
                break
        epoch += 1
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-10:])
    return {"model": model_name, "preset": "cifar10_swrn_28_10_2_cutout", "batch": batch, "steps": steps,
            "amp": str(dtype), "lr": config.lr, "cutout": config.cutout, "loss_first5": round(first, 4),
            "loss_last10": round(last, 4), "losses": [round(v, 4) for v in losses],
            "seconds": round(time.perf_counter() - started, 2),
            "ok": all(math.isfinite(v) for v in losses) and last < 0.5 * first}


# -- algorithmic presets ----------------------------------------------------------------------------
def _algorithmic_config(ctx: Context, preset: str, out: Path, **extra):
    overrides: dict[str, Any] = {"device": str(ctx.device), "out_dir": str(out), **extra}
    if ctx.dry_run:
        # tiny, and without the presets' multi-epoch warm-up, so two epochs show the loss falling
        overrides.update(width=8, depth=4, train_count=256, test_count=16, batch_size=16, warmup_epochs=0.0,
                         val_size=16, lr=1e-2)
    return resolve_config(preset, overrides=overrides)


def part_algo_speed(ctx: Context) -> dict:
    """Training steps/s of the *_gpu presets: the trainer's step (autocast, progressive loss,
    gradient clipping, `loss.item()`), on the preset's batches, timed after warm-up."""
    device = ctx.device
    warmup, steps = (1, 3) if ctx.dry_run else (5, 40)
    data: dict[str, Any] = {}
    for preset in ("prefix_sums_gpu", "mazes_gpu"):
        config = _algorithmic_config(ctx, preset, ctx.work)
        torch.manual_seed(config.seed)
        task = make_task(config, device, DistInfo())
        model = task.build_model().to(device)
        if config.channels_last:
            softshare.to_channels_last(model)
        optimizer = build_optimizer(config, model)
        dtype = amp_dtype(config, device)
        batches = task.train_batches(0, 0)

        def step() -> None:
            batch = next(batches)
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss, _ = task.loss(model, batch)
            loss.item()  # the trainer syncs on the loss every step (divergence check)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()

        for _ in range(warmup):
            step()
        with _timer(device) as seconds:
            for _ in range(steps):
                step()
        data[preset] = {"task": config.task, "width": config.width, "depth": config.depth,
                        "batch": config.batch_size, "alpha": config.alpha, "steps": steps,
                        "parameters": sum(p.numel() for p in model.parameters()),
                        "steps_per_s": round(steps / seconds[0], 2),
                        "epoch_s": round(task.batches_per_epoch() * seconds[0] / steps, 1)}
        ctx.save(data)
    return data


def part_prefix_learn(ctx: Context) -> dict:
    """prefix_sums_gpu through `softshare.train` for a fixed number of epochs, one epoch per call,
    each resuming the last (so CUDA resume runs too); stops early, marked incomplete, when the
    next epoch would not fit the part's cap."""
    epochs = 2 if ctx.dry_run else 6
    data: dict[str, Any] = {"preset": "prefix_sums_gpu", "target_epochs": epochs, "epochs": [], "complete": False}
    run = ctx.work / "prefix"
    for epoch in range(1, epochs + 1):
        started = time.time()
        config = _algorithmic_config(ctx, "prefix_sums_gpu", ctx.work, name="prefix", epochs=epoch,
                                     checkpoint_every=1)
        if epoch == 1:
            data.update(width=config.width, depth=config.depth, batch=config.batch_size,
                        train_count=config.train_count, steps_per_epoch=config.train_count // config.batch_size)
        train(config, resume="auto" if epoch > 1 else None)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        data["epochs"] = [{k: r.get(k) for k in ("epoch", "train_loss", "train_acc", "val_acc", "seconds")}
                          for r in rows]
        data["steps"] = epoch * data["steps_per_epoch"]
        data["val_exact_match"] = rows[-1].get("val_acc")
        ctx.save(data)
        if epoch < epochs and ctx.remaining() < 1.5 * (time.time() - started) + 5:
            data["stopped_early"] = f"after epoch {epoch}: the next would not fit the part's cap"
            return data
    data["complete"] = True
    data["ok"] = data["epochs"][-1]["train_loss"] < data["epochs"][0]["train_loss"]
    return data


# -- DDP ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, world: int, port: int, out: Path, device: str) -> None:
    """One rank: join a gloo group first (so `softshare.train` keeps it instead of opening NCCL,
    which needs a GPU per rank), then train the digits preset; save this rank's weights."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    config = resolve_config("digits_tiny", overrides={"device": device, "out_dir": str(out), "name": "ddp",
                                                      "epochs": 2, "val_size": 0})
    result = train(config)
    torch.save({k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()}, out / f"w{rank}.pt")


def part_ddp(ctx: Context) -> dict:
    """Two ranks on one device: gradients all-reduced by DDP over gloo, BN statistics averaged,
    only rank 0 writes; both ranks must end with identical weights."""
    port, world = _free_port(), 2
    procs = [subprocess.Popen([sys.executable, __file__, "--ddp-worker", str(rank), str(world), str(port),
                               str(ctx.work), str(ctx.device)], env=_child_env(), cwd=REPO)
             for rank in range(world)]
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(ctx.remaining() - 5, 1)))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(None)
    data: dict[str, Any] = {"backend": "gloo", "world_size": world, "device": str(ctx.device),
                            "preset": "digits_tiny", "returncodes": codes}
    if all(code == 0 for code in codes):
        w0, w1 = (torch.load(ctx.work / f"w{r}.pt", weights_only=True) for r in range(world))
        rows = [json.loads(line) for line in (ctx.work / "ddp" / "metrics.jsonl").read_text().splitlines()]
        info = json.loads((ctx.work / "ddp" / "run_info.json").read_text())
        data.update(weights_identical=w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0),
                    epochs=[r["epoch"] for r in rows], train_loss=[round(r["train_loss"], 4) for r in rows],
                    val_acc=rows[-1].get("val_acc"), run_world_size=info.get("world_size"))
        data["ok"] = (data["weights_identical"] and data["epochs"] == [1, 2] and info.get("world_size") == world
                      and rows[-1]["train_loss"] < rows[0]["train_loss"])
    else:
        data["ok"] = False
    return data


WORKERS: dict[str, Callable[[Context], dict]] = {
    "env": part_env, "tests": part_tests, "speed_eager": part_speed_eager, "speed_compiled": part_speed_compiled,
    "cifar_sanity": part_cifar_sanity, "algo_speed": part_algo_speed, "ddp": part_ddp,
    "prefix_learn": part_prefix_learn,
}
assert list(WORKERS) == PART_NAMES


# ================================================================================================
# The orchestrator
# ================================================================================================
def _child_env() -> dict[str, str]:
    """The environment of the parts: softshare importable from this checkout even when not installed."""
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_part(part: Part, out: Path, dry_run: bool, cap: float) -> dict:
    """Run one part in its own process group; kill the group at the cap. Never raises."""
    work = out / "work" / part.name
    work.mkdir(parents=True, exist_ok=True)
    result_path = work / "result.json"
    result_path.unlink(missing_ok=True)
    log_path = out / "logs" / f"{part.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--run-part", part.name, "--work", str(work), "--result", str(result_path),
           "--deadline", str(time.time() + cap)] + (["--dry-run"] if dry_run else [])
    started = time.perf_counter()
    status, error = "ok", None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(), cwd=REPO,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the part and anything it started (pytest, DDP ranks)
            proc.wait()
            status, error = "timeout", f"stopped at its cap of {cap:.0f} s"
        else:
            if code != 0:
                status = "failed"
    seconds = time.perf_counter() - started
    data = None
    if result_path.exists():
        with contextlib.suppress(ValueError):
            data = json.loads(result_path.read_text())
    if status == "failed":
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        error = "\n".join(tail) or f"exit code {code}"
    elif status == "ok" and data is None:
        status, error = "failed", "the part wrote no result"
    elif status == "ok" and data.get("ok") is False:
        status = "check failed"
    return {"title": part.title, "status": status, "seconds": round(seconds, 1), "cap_s": round(cap, 1),
            "error": error, "log": str(log_path.relative_to(out)), "data": data}


def evaluate_targets(parts: dict[str, dict]) -> list[dict]:
    """The issue's targets, each pass/fail/null (not measured), from the parts' data."""
    targets = []

    def data(name: str) -> dict:
        return (parts.get(name) or {}).get("data") or {}

    for mode in ("eager", "compiled"):
        models = data(f"speed_{mode}").get("models", {})
        rows = len(targets)
        for name, entry in models.items():
            if "ratio_to_plain" in entry:
                ratio = entry["ratio_to_plain"]
                targets.append({"target": f"{name} / {data(f'speed_{mode}')['plain']} training throughput, {mode}",
                                "goal": f">= {TARGET_RATIO}", "value": ratio, "pass": ratio >= TARGET_RATIO})
        if len(targets) == rows:  # the part failed or stopped before its medians
            targets.append({"target": f"shared/plain training throughput, {mode}", "goal": f">= {TARGET_RATIO}",
                            "value": None, "pass": None})
    projections = [(data(f"speed_{m}")["models"].get(data(f"speed_{m}")["recipe_model"], {})
                    .get("projected_recipe_min"), m) for m in ("eager", "compiled") if data(f"speed_{m}")]
    projections = [(v, m) for v, m in projections if v is not None]
    best = min(projections) if projections else None
    recipe_model = next((data(f"speed_{m}")["recipe_model"] for m in ("eager", "compiled") if data(f"speed_{m}")),
                        "swrn_28_10_2")
    targets.append({"target": f"projected {RECIPE_EPOCHS}-epoch {recipe_model} recipe (training steps only; "
                              f"best of eager/compiled{', ' + best[1] if best else ''})",
                    "goal": f"< {TARGET_RECIPE_MIN:.0f} min", "value": best[0] if best else None,
                    "pass": None if best is None else best[0] < TARGET_RECIPE_MIN})
    tests = data("tests")
    targets.append({"target": "device tests", "goal": "none fails",
                    "value": None if "tests" not in tests else f"{tests['passed']}/{tests['tests']} passed",
                    "pass": None if "tests" not in tests else bool(tests.get("ok"))})
    learn = data("prefix_learn")
    targets.append({"target": f"prefix_sums_gpu validation exact match after {learn.get('steps')} steps",
                    "goal": "reported", "value": learn.get("val_exact_match"), "pass": None})
    for name, label in (("cifar_sanity", "CIFAR recipe, synthetic data: loss falls to < 0.5x"),
                        ("ddp", "DDP (gloo, 2 ranks): identical weights, loss falls")):
        ok = data(name).get("ok")
        targets.append({"target": label, "goal": "yes", "value": ok, "pass": ok})
    return targets


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def render_markdown(report: dict) -> str:
    """The human-readable report: targets first, then each part's figures."""
    env = (report["parts"].get("env") or {}).get("data") or {}
    lines = [f"# softshare GPU check{' (DRY RUN on CPU: no GPU figure)' if report['dry_run'] else ''}", ""]
    lines += [f"{env.get('date', report['finished'])}, {env.get('device', '?')}, torch {env.get('torch', '?')} "
              f"(CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, driver {env.get('driver')}), "
              f"softshare {env.get('softshare', '?')} at {env.get('git_commit')}; total {report['seconds']:.0f} s "
              f"of a {report['budget_s']:.0f} s budget.", ""]
    lines += ["## Targets", "", "| target | goal | value | result |", "| --- | --- | ---: | --- |"]
    for t in report["targets"]:
        result = ("PASS" if t["pass"] else "FAIL") if t["pass"] is not None else (
            "not measured" if t["value"] is None else "reported")
        lines.append(f"| {t['target']} | {t['goal']} | {_fmt(t['value'])} | {result} |")
    lines += ["", "## Parts", "", "| part | status | seconds | cap |", "| --- | --- | ---: | ---: |"]
    for name, part in report["parts"].items():
        lines.append(f"| {part['title']} (`{name}`) | {part['status']} | {part['seconds']} | {part['cap_s']} |")
    for name, part in report["parts"].items():
        if part.get("error"):
            lines += ["", f"`{name}`: {part['status']}", "", "```", part["error"], "```"]
    for mode in ("eager", "compiled"):
        speed = (report["parts"].get(f"speed_{mode}") or {}).get("data")
        if not speed:
            continue
        lines += ["", f"## Training speed, {mode} (batch {speed['batch']}, bf16 autocast, channels-last; "
                      f"median of {speed['rounds']} interleaved rounds of {speed['steps_per_round']} steps)", "",
                  "| model | parameters | images/s | / plain | peak memory GiB | TFLOP/s | of bf16 peak | "
                  f"{RECIPE_EPOCHS} epochs (min) | warm-up s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for model, e in speed["models"].items():
            lines.append(f"| {model} | {e['parameters']:,} | {_fmt(e.get('images_per_s'))} | "
                         f"{_fmt(e.get('ratio_to_plain'))} | {_fmt(e.get('peak_memory_gib'))} | "
                         f"{_fmt(e.get('tflops'))} | {_fmt(e.get('fraction_of_peak'))} | "
                         f"{_fmt(e.get('projected_recipe_min'))} | {_fmt(e.get('warmup_s'))} |")
    algo = (report["parts"].get("algo_speed") or {}).get("data")
    if algo:
        lines += ["", "## Algorithmic presets", "", "| preset | width x depth | batch | steps/s | epoch s |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for preset, e in algo.items():
            lines.append(f"| {preset} | {e['width']} x {e['depth']} | {e['batch']} | {_fmt(e['steps_per_s'])} | "
                         f"{_fmt(e['epoch_s'])} |")
    learn = (report["parts"].get("prefix_learn") or {}).get("data")
    if learn and learn.get("epochs"):
        lines += ["", f"## prefix_sums_gpu learning ({learn.get('steps')} steps"
                      f"{'' if learn.get('complete') else ', INCOMPLETE'})", "",
                  "| epoch | train loss | train exact match | val exact match | seconds |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        for e in learn["epochs"]:
            lines.append(f"| {e['epoch']} | {_fmt(e['train_loss'])} | {_fmt(e['train_acc'])} | "
                         f"{_fmt(e['val_acc'])} | {_fmt(e['seconds'])} |")
    cifar = (report["parts"].get("cifar_sanity") or {}).get("data")
    if cifar:
        lines += ["", f"## CIFAR recipe on synthetic data: {cifar['model']}, {cifar['steps']} steps of "
                      f"{cifar['batch']}: loss {cifar['loss_first5']} (first 5) -> {cifar['loss_last10']} "
                      f"(last 10), {cifar['seconds']} s"]
    tests = (report["parts"].get("tests") or {}).get("data")
    if tests and "tests" in tests:
        lines += ["", f"## Device tests: {tests['passed']} passed, {tests['failures']} failed, "
                      f"{tests['errors']} errors, {tests['skipped']} skipped ({tests['seconds']} s)"]
        lines += [f"- FAILED {name}" for name in tests.get("failed", [])]
    ddp = (report["parts"].get("ddp") or {}).get("data")
    if ddp and "weights_identical" in ddp:
        lines += ["", f"## DDP: {ddp['world_size']} ranks, {ddp['backend']}, {ddp['device']}: weights identical "
                      f"{_fmt(ddp['weights_identical'])}, train loss {ddp['train_loss']}"]
    return "\n".join(lines) + "\n"


class UsageError(Exception):
    """Bad input: one line on stderr, exit 2."""


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a directory holding something other than an earlier report, unless --overwrite."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT_JSON).exists() and not overwrite:
        raise UsageError(f"--out {out} is not empty and holds no {REPORT_JSON}; pick an empty directory "
                         f"or pass --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create --out {out}: {err.strerror}") from None


def run_check(out: Path, dry_run: bool, only: list[str], budget: float,
              log: Callable[[str], None] = print) -> dict:
    """Run the parts in order inside `budget` seconds, write both reports, return the JSON one."""
    started = time.perf_counter()
    parts_to_run = [p for p in PARTS if p.name in only]
    parts: dict[str, dict] = {}
    for i, part in enumerate(parts_to_run):
        left = budget - (time.perf_counter() - started) - sum(p.floor_s for p in parts_to_run[i + 1:])
        cap = min(part.dry_cap_s if dry_run else part.cap_s, left)
        if cap < 5:
            parts[part.name] = {"title": part.title, "status": "skipped", "seconds": 0.0, "cap_s": round(cap, 1),
                                "error": "no time left in the budget", "log": None, "data": None}
        else:
            log(f"[gpu-check] {part.name}: cap {cap:.0f} s ...")
            parts[part.name] = run_part(part, out, dry_run, cap)
        log(f"[gpu-check] {part.name}: {parts[part.name]['status']} in {parts[part.name]['seconds']} s")
    report = {"format": FORMAT, "version": 1, "dry_run": dry_run, "budget_s": budget,
              "seconds": round(time.perf_counter() - started, 1),
              "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "parts": parts}
    report["targets"] = evaluate_targets(parts)
    for name, text in ((REPORT_JSON, json.dumps(report, indent=1, default=str) + "\n"),
                       (REPORT_MD, render_markdown(report))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Parts: " + ", ".join(PART_NAMES) + ". See docs/gpu.md.")
    parser.add_argument("--out", help="directory for gpu-report.json/.md, logs/ and work/")
    parser.add_argument("--dry-run", action="store_true", help="CPU at tiny sizes (tests the script and report)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty directory anyway")
    parser.add_argument("--only", default=",".join(PART_NAMES), help="comma-separated parts to run (default: all)")
    parser.add_argument("--budget", type=float, help=f"seconds for all parts together (default {TOTAL_BUDGET_S:.0f}; {DRY_BUDGET_S:.0f} with --dry-run)")
    for hidden in ("--run-part", "--work", "--result", "--deadline"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--ddp-worker", nargs=5, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ddp_worker:  # one rank of the ddp part
        rank, world, port, out, device = args.ddp_worker
        ddp_worker(int(rank), int(world), int(port), Path(out), device)
        return 0
    if args.run_part:  # one part, in its own process
        ctx = Context(args.dry_run, Path(args.work), Path(args.result), float(args.deadline))
        ctx.save(WORKERS[args.run_part](ctx))
        return 0
    try:
        if not args.out:
            raise UsageError("--out DIR is required (where gpu-report.json and gpu-report.md go)")
        only = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in only if name not in PART_NAMES]
        if unknown or not only:
            raise UsageError(f"unknown part(s) {unknown or args.only!r} in --only; choose from {', '.join(PART_NAMES)}")
        if args.budget is None:
            args.budget = DRY_BUDGET_S if args.dry_run else TOTAL_BUDGET_S
        if not args.budget > 0:
            raise UsageError(f"--budget must be > 0 seconds, got {args.budget}")
        if not args.dry_run:
            if not torch.cuda.is_available():
                raise UsageError("no CUDA GPU is visible; run on a GPU machine, or pass --dry-run to check on CPU")
        out = Path(args.out)
        prepare_out(out, args.overwrite)
    except UsageError as err:
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2
    report = run_check(out, args.dry_run, only, args.budget)
    failed = [name for name, part in report["parts"].items() if part["status"] != "ok"]
    print(f"[gpu-check] wrote {out / REPORT_JSON} and {out / REPORT_MD}"
          + (f"; not ok: {', '.join(failed)}" if failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
