"""Training-step speed of the algorithmic CPU presets against a single-thread fp32 matmul, in one run.

For each preset (`prefix_sums_cpu`, `mazes_cpu`) and body, one training step is exactly the
trainer's (`softshare.train.loop.build_model`, `train.epoch.step_loss` and `step_backward` on the task's own batches: the
task's loss, i.e. the full-depth forward for the training accuracy and the progressive loss's
iterations, then backward, gradient clipping, Adam). FLOPs per step are counted by torch's
`FlopCounterMode` over the same batches the timing uses (convolutions and matmuls, forward and
backward; elementwise ops count nothing). The references are 1024x1024 fp32 matmuls on one
thread: `torch.mm` (which runs MKL's SGEMM) and oneDNN's inner product (oneDNN also runs torch's
CPU convolutions). The cases and the references are timed in interleaved rounds (order
reversed every other round) by the process's CPU time, which leaves out the time the OS gives to
other processes; every round gives one ratio per case, and the tables show medians over rounds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_algorithmic.py            # ~1-2 min
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_algorithmic.py --quick    # smoke run, seconds
    ... --bodies recurrent --set channels_last=false batch_size=200   # variants of the presets
    ... --presets mazes_cpu --bodies recurrent --against grid=false     # the grid net against the image's
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread unless told otherwise, before torch loads

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from softshare.device import cpu_model  # noqa: E402
from softshare.train.config import apply_overrides, resolve_config  # noqa: E402
from softshare.train.distributed import DistInfo  # noqa: E402
from softshare.train.epoch import step_backward, step_loss  # noqa: E402
from softshare.train.loop import amp_dtype, build_model, make_task, seed_everything  # noqa: E402
from softshare.train.optim import build_optimizer  # noqa: E402

PRESETS = ("prefix_sums_cpu", "mazes_cpu")
BODIES = ("recurrent", "shared", "ff")
STEPS = {"prefix_sums_cpu": 12, "mazes_cpu": 2}  # training steps per case and round (~0.5-1.2 s)


@dataclass
class Case:
    """One preset and body: its model, optimizer and batches, and the timings of its rounds."""

    label: str
    step: Callable[[], None]  # runs all of the case's batches once
    steps: int
    flops: float = 0.0  # per step, averaged over the batches
    cpu: list[float] = field(default_factory=list)  # CPU seconds per step, one per round
    wall: list[float] = field(default_factory=list)


def build_case(preset: str, body: str, steps: int, overrides: dict) -> Case:
    """The trainer's model, optimizer and first `steps` batches of epoch 0 for `preset` with `body`."""
    base = resolve_config(preset, overrides={"model": body})
    config = apply_overrides(base, overrides, "--set")
    config = apply_overrides(config, {"train_count": config.batch_size * steps}, "the benchmark")  # no more data
    device = torch.device("cpu")
    seed_everything(config.seed, config.deterministic)
    task = make_task(config, device, DistInfo())
    model = build_model(config, task, device)
    model.train()
    optimizer = build_optimizer(config, model)
    train_model = torch.compile(model) if config.compile else model
    batches = list(task.train_batches(0, 0))[:steps]
    autocast = amp_dtype(config, device)

    def run() -> None:
        for batch in batches:
            loss = step_loss(config, task, model, train_model, batch, autocast)[0]
            step_backward(config, model, optimizer, loss)
            optimizer.step()

    changed = "".join(f" {k}={v}" for k, v in overrides.items())
    return Case(f"{preset} {body}{changed}", run, steps)


def matmul_references(n: int) -> dict[str, Callable[[], None]]:
    """n x n fp32 matmuls: torch.mm (MKL SGEMM) and, where torch has it, oneDNN's inner product."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    refs = {"torch.mm": lambda: torch.mm(a, b)}
    if torch.backends.mkldnn.is_available():
        with warnings.catch_warnings():  # it defines its modules with the deprecated torch.jit.script_method
            warnings.simplefilter("ignore", DeprecationWarning)
            import torch.utils.mkldnn as mkldnn_utils

        linear = mkldnn_utils.to_mkldnn(nn.Linear(n, n, bias=False).eval())
        x = a.to_mkldnn()
        with torch.no_grad():
            linear(x)
        refs["oneDNN"] = lambda: linear(x)
    return refs


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def run(presets, bodies, rounds: int, steps: dict[str, int], overrides: dict, matmul_n: int = 1024,
        matmul_reps: int = 8, log=print, against: dict | None = None) -> dict:
    """Build every case, count its FLOPs (that pass is also its warm-up), then time interleaved rounds.

    `against`: overrides of a second case per preset and body, timed in the same rounds; the
    table then also gives each case's steps per CPU-second over its second's (median per round)."""
    cases = [build_case(p, b, steps[p], overrides) for p in presets for b in bodies]
    pairs = len(cases) if against else 0
    if against:
        cases += [build_case(p, b, steps[p], {**overrides, **against}) for p in presets for b in bodies]
    for case in cases:
        with FlopCounterMode(display=False) as counter:
            case.step()
        case.flops = counter.get_total_flops() / case.steps
        case.step()  # a second warm-up, outside the counter
    refs = matmul_references(matmul_n)
    ref_cpu: dict[str, list[float]] = {name: [] for name in refs}
    with torch.no_grad():
        for fn in refs.values():
            fn()

    def reference(name: str) -> Callable[[], None]:
        def go() -> None:
            fn = refs[name]
            with torch.no_grad():
                cpu, _ = timed(lambda: [fn() for _ in range(matmul_reps)])
            ref_cpu[name].append(cpu / matmul_reps)
        return go

    def case_runner(case: Case) -> Callable[[], None]:
        def go() -> None:
            cpu, wall = timed(case.step)
            case.cpu.append(cpu / case.steps)
            case.wall.append(wall / case.steps)
        return go

    order = [reference(name) for name in refs] + [case_runner(c) for c in cases]
    began = time.perf_counter()
    for r in range(rounds):
        for go in (order if r % 2 == 0 else order[::-1]):
            go()
    seconds = time.perf_counter() - began

    matmul_flops = 2 * matmul_n ** 3
    ref_rate = {name: [matmul_flops / t for t in times] for name, times in ref_cpu.items()}
    rows = []
    for case in cases:
        rates = [case.flops / t for t in case.cpu]
        row = {"case": case.label, "steps_s": 1 / statistics.median(case.cpu),
               "steps_s_wall": 1 / statistics.median(case.wall), "gflop_step": case.flops / 1e9,
               "gflop_s": case.flops / statistics.median(case.cpu) / 1e9}
        for name, ref in ref_rate.items():  # per-round ratios, then their median
            row[f"{name}_gflop_s"] = statistics.median(ref) / 1e9
            row[f"{name}_ratio"] = statistics.median(c / m for c, m in zip(rates, ref))
        rows.append(row)

    log(f"torch={torch.__version__} threads={torch.get_num_threads()} cpu={cpu_model()} "
        f"vcpus={os.cpu_count()} load={' '.join(f'{x:.1f}' for x in os.getloadavg())} "
        f"rounds={rounds} timed={seconds:.0f}s python={platform.python_version()}")
    names = list(refs)
    head = ["preset / body", "steps/s (CPU)", "steps/s (wall)", "GFLOP/step", "GFLOP/s (CPU)"]
    for name in names:
        head += [f"{name} GFLOP/s", f"/ {name}"]
    log("| " + " | ".join(head) + " |")
    log("|" + "---|" * len(head))
    for row in rows:
        cells = [row["case"], f"{row['steps_s']:.2f}", f"{row['steps_s_wall']:.2f}", f"{row['gflop_step']:.2f}",
                 f"{row['gflop_s']:.1f}"]
        for name in names:
            cells += [f"{row[f'{name}_gflop_s']:.1f}", f"**{100 * row[f'{name}_ratio']:.0f}%**"]
        log("| " + " | ".join(cells) + " |")
    speedups = []
    for first, second in zip(cases[:pairs], cases[pairs:]):  # the same rounds: a ratio per round, then its median
        ratio = statistics.median(b / a for a, b in zip(first.cpu, second.cpu))
        speedups.append({"case": first.label, "against": second.label, "speedup": ratio})
        log(f"{first.label}: {ratio:.2f}x the steps per CPU-second of {second.label}")
    return {"rows": rows, "speedups": speedups,
            "references": {k: statistics.median(v) / 1e9 for k, v in ref_rate.items()}}


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 iterations, 1 step, 2 rounds")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--presets", nargs="*", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--bodies", nargs="*", default=["recurrent", "shared"], choices=BODIES)
    parser.add_argument("--steps", type=int, help="training steps per case and round (default: per preset)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="training-config overrides for every case (JSON values), e.g. channels_last=false")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--against", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="also time each case with these overrides, in the same rounds, and print the "
                             "speed-up, e.g. --presets mazes_cpu --against grid=false")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = _parse_set(args.set)
    steps = {p: args.steps or STEPS[p] for p in PRESETS}
    if args.quick:
        overrides = {"depth": 5, **overrides}
        return run(args.presets, args.bodies[:1], 2, {p: 1 for p in PRESETS}, overrides, matmul_n=256, matmul_reps=2,
                   against=_parse_set(args.against))
    return run(args.presets, args.bodies, args.rounds, steps, overrides, against=_parse_set(args.against))


if __name__ == "__main__":
    main()
