"""`softshare demo` / `make demo`: the whole story on generated mazes, in minutes on a CPU.

Generate mazes -> train a soft-shared net and its feed-forward control (same depth and width)
-> parameter counts -> Layer Similarity Matrix -> fold the shared net into a loop -> evaluate
all three on larger mazes than trained, the folded net also with extra loop iterations ->
`runs/demo/report.md`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..analysis import save_lsm, sharing_stats
from ..checkpoint import load, save_checkpoint
from ..data.tasks import evaluation_examples, write_mazes
from ..device import environment_description
from ..errors import SoftshareError
from ..eval.algorithmic import exact_match_by_iteration, exact_match_thinking_longer, longest_loop
from ..fold import DEFAULT_THRESHOLD, fold_model
from ..io import check_output, rebuild_dir, save_figure, write_json, write_text
from ..train.config import TrainConfig, resolve_config


@dataclass
class DemoConfig:
    """Defaults take ~3.5 minutes on 2 idle CPU cores; scale up with the flags of `softshare demo`."""

    out: str = "runs/demo"
    train_size: int = 9
    test_sizes: list[int] = field(default_factory=lambda: [9, 13, 17])
    train_count: int = 2000
    test_count: int = 100
    width: int = 16
    depth: int = 16
    num_templates: int = 8
    epochs: int = 40
    lr: float = 0.002
    recurrence_reg: float = 1.0
    threshold: float = DEFAULT_THRESHOLD
    extra_iterations: int = 16
    seed: int = 0
    device: str = "cpu"


def _say(message: str) -> None:
    print(message, flush=True)


def run_demo(config: DemoConfig, overwrite: bool = False) -> Path:
    """Run every step into `config.out`; a failed or interrupted demo leaves the previous output.

    `config.out` must be new, empty or an earlier demo's output, unless `overwrite`."""
    started = time.perf_counter()
    out = check_output(config.out, "demo", overwrite=overwrite, legacy=("report.md", "results.json"))
    with rebuild_dir(out, "demo") as work:
        data = work / "data"
        _say(f"[1/6] generating mazes: {config.train_count} of size {config.train_size} for training, "
             f"{config.test_count} per test size {config.test_sizes}")
        write_mazes(data, "train", config.train_size, config.train_count + config.test_count, seed=config.seed)
        for size in config.test_sizes:
            write_mazes(data, "test", size, config.test_count, seed=config.seed)

        _say(f"[2/6] training the shared and the feed-forward net side by side (width {config.width}, "
             f"{config.depth} blocks, {config.epochs} epochs)")
        configs = {kind: _train_config(config, kind, data, work / "runs") for kind in ("shared", "ff")}
        _train_side_by_side(configs, config.device)
        shared_config = configs["shared"]
        shared_model, ff_model = (load(work / "runs" / kind, device=config.device) for kind in ("shared", "ff"))

        _say("[3/6] parameters")
        folded = fold_model(shared_model, config.threshold)
        params = {"ff": sharing_stats(ff_model).total, "shared": sharing_stats(shared_model).total,
                  "folded": folded.params_after}
        for name, count in params.items():
            _say(f"      {name:8s} {count:>9,}")

        _say("[4/6] layer similarity matrix of the shared net")
        lsm_files = save_lsm(shared_model, work / "lsm")

        _say(f"[5/6] folding at threshold {config.threshold}: loops {folded.loops}")
        save_checkpoint(work / "folded", folded.model, config=shared_config.to_dict(),
                        epoch=shared_config.epochs)

        _say("[6/6] exact match on larger mazes than trained")
        device = torch.device(config.device)
        # think longer: the longest loop runs `extra_iterations` more times (the rest as trained)
        thinks_longer = bool(config.extra_iterations) and longest_loop(folded.model) is not None
        extra = config.depth + config.extra_iterations if thinks_longer else None
        table = {}
        for size in config.test_sizes:
            x, y = evaluation_examples(shared_config.to_dict(), size, config.test_count, str(data))
            row = {name: exact_match_by_iteration(model, "mazes", x, y, config.depth, 100, device)[-1]
                   for name, model in (("ff", ff_model), ("shared", shared_model), ("folded", folded.model))}
            if thinks_longer:
                curve = exact_match_thinking_longer(folded.model, "mazes", x, y, config.extra_iterations, 100, device)
                row["folded_extra"], row["folded_curve"] = curve[-1], curve
            table[str(size)] = row
            _say(f"      size {size:3d}: " + "  ".join(f"{k} {v:.2f}" for k, v in row.items() if k != "folded_curve"))

        results = {"config": config.__dict__, "params": params, "loops": folded.loops, "exact_match": table,
                   "extra_iterations": extra, "seconds": round(time.perf_counter() - started, 1),
                   "hardware": environment_description(device), "torch": torch.__version__}
        write_json(work / "results.json", results)
        _plot_accuracy(results, work / "accuracy.png")
        for kind in ("shared", "ff"):
            shutil.copy(work / "runs" / kind / "curves.png", work / f"curves_{kind}.png")
        write_text(work / "report.md", _report(results, [p.name for p in lsm_files if p.suffix == ".png"]))
    _say(f"done in {time.perf_counter() - started:.0f} s: {out / 'report.md'}")
    return out / "report.md"


def _train_config(config: DemoConfig, kind: str, data: Path, runs: Path) -> TrainConfig:
    overrides = dict(model=kind, width=config.width, depth=config.depth, num_templates=config.num_templates,
                     epochs=config.epochs, lr=config.lr, train_size=config.train_size, test_sizes=config.test_sizes,
                     train_count=config.train_count, test_count=config.test_count, seed=config.seed,
                     data_root=str(data), out_dir=str(runs), name=kind, device=config.device,
                     recurrence_reg=config.recurrence_reg if kind == "shared" else 0.0)
    return resolve_config("mazes_cpu", overrides=overrides)


def _train_side_by_side(configs: dict[str, TrainConfig], device: str) -> None:
    """One `softshare train` process per net, in parallel: small nets barely use a second core
    each, so two single-threaded runs take half the time of two two-threaded ones."""
    threads = max(1, (os.cpu_count() or 2) // len(configs)) if device == "cpu" else None
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    procs = {}
    for kind, train_config in configs.items():
        config_file = Path(train_config.out_dir) / f"{kind}.json"
        write_json(config_file, train_config.to_dict())
        procs[kind] = subprocess.Popen([sys.executable, "-m", "softshare", "train", "--config", str(config_file)],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    readers = [threading.Thread(target=_relay, args=(kind, proc.stdout), daemon=True) for kind, proc in procs.items()]
    for reader in readers:
        reader.start()
    try:
        codes = {kind: proc.wait() for kind, proc in procs.items()}
    except BaseException:
        for proc in procs.values():
            proc.terminate()
        raise
    for reader in readers:
        reader.join()
    failed = [kind for kind, code in codes.items() if code != 0]
    if failed:
        if all(code == 130 for code in codes.values()):
            raise KeyboardInterrupt
        raise SoftshareError(f"training the {' and '.join(failed)} net failed (see the lines above)")


def _relay(kind: str, stream) -> None:
    for line in stream:
        print(f"      [{kind}] {line.rstrip()}", flush=True)


def _plot_accuracy(results: dict, path: Path) -> None:
    table = results["exact_match"]
    sizes = list(table)
    fig = Figure(figsize=(11, 4), layout="tight")
    ax_size, ax_iter = fig.subplots(1, 2)
    for name in ("ff", "shared", "folded", "folded_extra"):
        if all(name in table[s] for s in sizes):
            label = name if name != "folded_extra" else f"folded, {results['extra_iterations']} iterations"
            ax_size.plot([int(s) for s in sizes], [table[s][name] for s in sizes], marker="o", label=label)
    ax_size.set(xlabel="maze size (trained at %d)" % results["config"]["train_size"], ylabel="exact match",
                title="extrapolation to larger mazes", ylim=(-0.02, 1.02))
    for size in sizes:
        curve = table[size].get("folded_curve")
        if curve:
            ax_iter.plot(range(1, len(curve) + 1), curve, label=f"size {size}")
    ax_iter.axvline(results["config"]["depth"], color="grey", ls="--", lw=1)
    ax_iter.set(xlabel="loop iterations (dashed: trained depth)", ylabel="exact match",
                title="folded net: thinking longer", ylim=(-0.02, 1.02))
    for ax in (ax_size, ax_iter):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    save_figure(fig, path)


def _report(results: dict, lsm_pngs: list[str]) -> str:
    c, p, table = results["config"], results["params"], results["exact_match"]
    extra = results["extra_iterations"]
    columns = ["ff", "shared", "folded"] + (["folded_extra"] if extra else [])
    heads = ["feed-forward", "soft-shared", "folded"] + ([f"folded, {extra} it."] if extra else [])
    lines = [
        "# softshare demo report", "",
        f"Mazes of size {c['train_size']} ({c['train_count']} for training), nets of width {c['width']} "
        f"and {c['depth']} residual blocks; the soft-shared net draws all {2 * c['depth']} block convs from "
        f"one bank of {c['num_templates']} templates (recurrence regulariser {c['recurrence_reg']}). "
        f"One seed ({c['seed']}), {c['epochs']} epochs each, {results['hardware']}, "
        f"{results['seconds']:.0f} s in all.", "",
        "| | feed-forward | soft-shared | folded |", "| --- | ---: | ---: | ---: |",
        f"| parameters | {p['ff']:,} | {p['shared']:,} | {p['folded']:,} |", "",
        f"Folding at LSM >= {c['threshold']} gave loops of lengths {results['loops']} (one list per bank).", "",
        "Exact match (every open pixel right) on unseen test mazes:", "",
        "| maze size | " + " | ".join(heads) + " |", "| ---: |" + " ---: |" * len(columns),
    ]
    for size, row in table.items():
        lines.append(f"| {size} | " + " | ".join(f"{row[k]:.2f}" for k in columns) + " |")
    lines += ["", "![exact match](accuracy.png)", "", "## Layer Similarity Matrix of the soft-shared net", ""]
    lines += [f"![LSM](lsm/{name})" for name in lsm_pngs]
    lines += ["", "## Training curves", "", "![shared](curves_shared.png) ![ff](curves_ff.png)", "",
              "## Go further", "", "```bash",
              "softshare experiment algorithmic                  # ff vs shared (k=1,2,4) vs recurrent, 3 seeds",
              "softshare train --preset fashion_mnist_cpu        # SWRN on real images: 93.6% in ~22 min on one core",
              "softshare train --preset cifar10_swrn_28_10_2_cutout --data-root DIR   # the paper's recipe (GPU)",
              "torchrun --nproc-per-node 4 -m softshare train --preset cifar100_swrn_28_10_2_cutout",
              "softshare lsm runs/<name> && softshare fold runs/<name> --sweep --data cifar10 --out fold/",
              "softshare demo --width 32 --depth 20 --epochs 30 --device cuda   # a bigger demo", "```", ""]
    return "\n".join(lines)
