"""What soft sharing costs per training step, and how the bank materialises weights.

1. Training-step time (forward + backward + SGD step; channels-last fp32 on CPU) of SWRN-L-w-k
   against the WRN-L-w of the same architecture. The models of one comparison are built once
   and stepped in turn, round after round (the order reversed every other round), so slow drift
   of the machine hits all of them alike; each round gives one shared/plain ratio and the
   report is the median over rounds.
2. Materialising the weights of one bank (forward + backward): the library's bank-wide GEMM
   (``TemplateBank.weight_for``) against a broadcast multiply-and-sum ``(a[:, None, ...] * T).sum(0)``
   and a per-layer contraction (each layer its own ``torch.tensordot``).

    python benchmarks/bench_sharing.py              # full run, 1 thread (~5-10 min)
    python benchmarks/bench_sharing.py --quick      # smoke run, seconds
    python benchmarks/bench_sharing.py --threads 0  # torch's default thread count
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import softshare
from softshare.device import cpu_model
from softshare.train.config import TrainConfig
from softshare.train.optim import build_optimizer


# -- environment ------------------------------------------------------------------------------
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD",
                 "THP_MEM_ALLOC_ENABLE")


def environment() -> dict:
    env = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mkldnn": torch.backends.mkldnn.is_available(),
    }
    env.update({name: os.environ[name] for name in ALLOCATOR_ENV if name in os.environ})
    return env


# -- training steps ---------------------------------------------------------------------------
class Trainer:
    """One model with its optimizer and a fixed synthetic batch (the paper's SGD recipe)."""

    def __init__(self, name: str, batch: int, seed: int = 0, image_size: int = 32) -> None:
        torch.manual_seed(seed)
        self.name = name
        self.model = softshare.to_channels_last(softshare.create_model(name, num_classes=10))
        self.model.train()
        self.optimizer = build_optimizer(TrainConfig(), self.model)  # exactly what `softshare train` uses
        self.x = torch.randn(batch, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, 10, (batch,))

    def step(self) -> tuple[float, float]:
        """One training step; (wall-clock seconds, CPU seconds of this process)."""
        wall, cpu = time.perf_counter(), time.process_time()
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - wall, time.process_time() - cpu


@dataclass
class StepComparison:
    plain: str
    batch: int
    times: dict[str, list[float]] = field(default_factory=dict)  # model -> wall seconds per round
    cpu: dict[str, list[float]] = field(default_factory=dict)  # model -> CPU seconds per round

    def median_time(self, name: str, cpu: bool = False) -> float:
        return statistics.median((self.cpu if cpu else self.times)[name])

    def ratios(self, name: str, cpu: bool = False) -> list[float]:
        times = self.cpu if cpu else self.times
        return [s / p for s, p in zip(times[name], times[self.plain])]

    def median_ratio(self, name: str, cpu: bool = False) -> float:
        return statistics.median(self.ratios(name, cpu))


def compare_steps(plain: str, shared: Sequence[str], batch: int, rounds: int, warmup: int = 2,
                  log: Callable[[str], None] = print) -> StepComparison:
    """Interleaved step times of `plain` and each model in `shared`, `rounds` rounds."""
    trainers = [Trainer(name, batch) for name in (plain, *shared)]
    for trainer in trainers:
        for _ in range(warmup):
            trainer.step()
    result = StepComparison(plain, batch, {t.name: [] for t in trainers}, {t.name: [] for t in trainers})
    for r in range(rounds):
        order = trainers if r % 2 == 0 else trainers[::-1]
        for trainer in order:
            wall, cpu = trainer.step()
            result.times[trainer.name].append(wall)
            result.cpu[trainer.name].append(cpu)
        log(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{t.name} {result.times[t.name][-1]:.3f}s (cpu {result.cpu[t.name][-1]:.3f}s)" for t in trainers))
    return result


# -- materialisation --------------------------------------------------------------------------
def _bank_setup(num_layers: int, k: int, shape: Sequence[int], seed: int = 0):
    torch.manual_seed(seed)
    bank = softshare.TemplateBank(k, shape)
    layers = [softshare.SharedConv2d(bank, padding=1) for _ in range(num_layers)]
    softshare.init_coefficients(layers)
    softshare.to_channels_last(torch.nn.ModuleList(layers))
    # conv weight gradients come back in the weights' (channels-last) layout
    grads = [torch.randn(shape).contiguous(memory_format=torch.channels_last) for _ in layers]
    return bank, layers, grads


def _library(bank, layers):
    return [bank.weight_for(layer) for layer in layers]  # what a forward pass uses


def _broadcast(bank, layers):
    t = bank.templates
    return [(layer.coefficients.view(-1, *([1] * (t.dim() - 1))) * t).sum(0) for layer in layers]


def _tensordot(bank, layers):
    return [torch.tensordot(layer.coefficients, bank.templates, dims=1) for layer in layers]


MATERIALISERS: dict[str, Callable] = {"library": _library, "broadcast": _broadcast, "per-layer": _tensordot}


def bench_materialise(num_layers: int, k: int, shape: Sequence[int], rounds: int,
                      warmup: int = 1) -> dict[str, list[float]]:
    """CPU seconds per forward+backward of all layers' weights of one bank, per method and round."""
    bank, layers, grads = _bank_setup(num_layers, k, shape)
    params = [bank.templates] + [layer.coefficients for layer in layers]

    def run(method):
        for p in params:
            p.grad = None
        start = time.process_time()
        weights = method(bank, layers)
        torch.autograd.backward(weights, grads)
        return time.process_time() - start

    times: dict[str, list[float]] = {name: [] for name in MATERIALISERS}
    for method in MATERIALISERS.values():
        for _ in range(warmup):
            run(method)
    for r in range(rounds):
        for name, method in (MATERIALISERS.items() if r % 2 == 0 else reversed(MATERIALISERS.items())):
            times[name].append(run(method))
    return times


def check_materialisers_agree(num_layers: int = 3, k: int = 2, shape=(8, 8, 3, 3)) -> None:
    """The three methods give the same weights and gradients (guards the benchmark itself)."""
    bank, layers, grads = _bank_setup(num_layers, k, shape)
    params = [bank.templates] + [layer.coefficients for layer in layers]
    reference = None
    for method in MATERIALISERS.values():
        for p in params:
            p.grad = None
        weights = method(bank, layers)
        torch.autograd.backward(weights, grads)
        got = [w.detach().clone() for w in weights] + [p.grad.clone() for p in params]
        if reference is None:
            reference = got
        for a, b in zip(reference, got):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# -- report -----------------------------------------------------------------------------------
STEP_PLAN = [  # (plain, shared models, batch, rounds)
    ("wrn_16_4", ["swrn_16_4_1"], 32, 14),
    ("wrn_28_10", ["swrn_28_10_2", "swrn_28_10_6"], 8, 14),
    ("wrn_28_10", ["swrn_28_10_6"], 32, 6),
]
QUICK_STEP_PLAN = [("wrn_16_1", ["swrn_16_1_2"], 4, 3)]
MATERIALISE_PLAN = [  # (label, layers, k, template shape, rounds): the SWRN-28-10 stage-3 banks
    ("SWRN-28-10-6 stage 3 (6 layers, k=6, 640x640x3x3)", 6, 6, (640, 640, 3, 3), 7),
    ("SWRN-28-10-2 stage 3 (6 layers, k=2, 640x640x3x3)", 6, 2, (640, 640, 3, 3), 7),
]
QUICK_MATERIALISE_PLAN = [("6 layers, k=3, 32x32x3x3", 6, 3, (32, 32, 3, 3), 3)]


def run(quick: bool = False, step_plan=None, materialise_plan=None, log=print) -> dict:
    """Run the benchmark; returns the measurements (also used by the smoke test)."""
    step_plan = step_plan if step_plan is not None else (QUICK_STEP_PLAN if quick else STEP_PLAN)
    materialise_plan = (materialise_plan if materialise_plan is not None
                        else (QUICK_MATERIALISE_PLAN if quick else MATERIALISE_PLAN))
    env = environment()
    log("soft-sharing benchmark: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    check_materialisers_agree()

    steps = []
    for plain, shared, batch, rounds in step_plan:
        log(f"\ntraining step, batch {batch}, {rounds} interleaved rounds: {plain} vs {', '.join(shared)}")
        steps.append(compare_steps(plain, shared, batch, rounds, warmup=1 if quick else 2, log=log))
    materialise = []
    for label, layers, k, shape, rounds in materialise_plan:
        log(f"\nmaterialise + backward, {label}, {rounds} rounds")
        materialise.append((label, bench_materialise(layers, k, shape, rounds)))

    log("\n## Training step (forward + backward + SGD), channels-last fp32, median over rounds")
    log("shared/plain = median of the per-round ratios; CPU = this process's CPU time (with 1 thread it")
    log("excludes time the OS gave to other processes, so it is the steadier measure on a shared machine)")
    log("| plain | shared | batch | plain s/step | shared s/step | shared/plain wall | shared/plain CPU |")
    log("|---|---|---|---|---|---|---|")
    for comp in steps:
        for name in comp.times:
            if name != comp.plain:
                log(f"| {comp.plain} | {name} | {comp.batch} | {comp.median_time(comp.plain):.3f} | "
                    f"{comp.median_time(name):.3f} | {comp.median_ratio(name):.3f} | "
                    f"{comp.median_ratio(name, cpu=True):.3f} |")
    log("\n## Materialising one bank's weights, forward + backward, median CPU ms")
    log("| bank | library (bank GEMM) | broadcast mul+sum | per-layer tensordot | broadcast/library | per-layer/library |")
    log("|---|---|---|---|---|---|")
    for label, times in materialise:
        med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
        log(f"| {label} | {med['library']:.1f} | {med['broadcast']:.1f} | {med['per-layer']:.1f} | "
            f"{med['broadcast'] / med['library']:.2f} | {med['per-layer'] / med['library']:.2f} |")
    return {"environment": env, "steps": steps, "materialise": materialise}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and banks: a smoke run in seconds")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: steady CPU-time ratios on a shared machine; "
                             "0 = torch's default, all cores)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    run(quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
