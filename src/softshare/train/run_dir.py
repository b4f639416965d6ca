"""The run directory: owning it for a run (lock, leftovers of a killed writer), config, provenance,
per-epoch metrics, curves, log."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..device import device_description
from ..errors import SoftshareError
from ..storage import LOCK_FILE, atomic_path, exclusive_lock, figure_path, recover_leftovers, save_figure, write_json
from ..version import __version__

log = logging.getLogger("softshare.train")
CURVES_EVERY_S = 10.0  # the least time between two drawings of a run's curves figure


def git_commit() -> str | None:
    """The commit of the softshare checkout, if it is one (provenance of the numbers)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        if out.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


@contextlib.contextmanager
def own_run_dir(run_path: Path) -> Iterator[None]:
    """Create/lock `run_path` for the whole run and finish what a killed writer left there.

    Refuses a directory that is not a run (nothing of the user's is ever written into), and
    removes the directory again if it was created here and the run failed before writing.
    """
    if run_path.exists() and not run_path.is_dir():
        raise SoftshareError(f"cannot write run directory {run_path}: it is a file; choose another --name "
                             f"or --out-dir")
    if run_path.is_dir() and not is_run_dir(run_path) and any(run_path.iterdir()):
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


def is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in ("config.json", "checkpoints", "metrics.jsonl", LOCK_FILE))


class RunDir:
    """Paths and writers of `runs/<name>/`. Only rank 0 constructs one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise SoftshareError(f"cannot write run directory {path}: {err.strerror}; "
                                 f"choose another --out-dir or fix its permissions") from None
        self.checkpoints = path / "checkpoints"
        self.metrics_path = path / "metrics.jsonl"
        self.config: dict | None = None  # the resolved config, once `write_info` has written it
        self._curves_drawn = -math.inf  # time.monotonic() of the last curves figure
        self._curves_pending: str | None = None  # the eval split of an epoch not drawn yet
        self._attach_log()

    def _attach_log(self) -> None:
        handler = logging.FileHandler(self.path / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        self._handler = handler

    def close(self) -> None:
        if self._curves_pending is not None:  # the last epochs came too fast to draw: draw them now
            self.plot_curves(self._curves_pending, force=True)
        log.removeHandler(self._handler)
        self._handler.close()

    def write_info(self, config: dict, device: torch.device, world_size: int, resumed: dict | None = None) -> None:
        """config.json and run_info.json; a resume is appended to run_info's "resumes" (with the
        settings it changed), so the run records every change made to it."""
        info_path = self.path / "run_info.json"
        try:
            previous = json.loads(info_path.read_text()) if resumed is not None else {}
        except (OSError, ValueError):
            previous = {}
        resumes = previous.get("resumes", []) if isinstance(previous, dict) else []
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if resumed is not None:
            resumes = [*resumes, {**resumed, "at": now, "argv": sys.argv}]
        write_json(self.path / "config.json", config)
        self.config = config
        write_json(info_path, {
            "softshare_version": __version__, "git_commit": git_commit(), "torch_version": torch.__version__,
            "python": platform.python_version(), "device": device_description(device),
            "world_size": world_size, "host": socket.gethostname(), "argv": sys.argv,
            "started": previous.get("started", now) if isinstance(previous, dict) else now,
            **({"resumes": resumes} if resumes else {}),
        })

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.path)

    def append_metrics(self, row: dict[str, Any], keep_epochs_below: int | None = None) -> None:
        """Append one epoch's metrics; on resume, drop rows of epochs that will be re-run."""
        rows = self.read_metrics()
        if keep_epochs_below is not None:
            rows = [r for r in rows if r["epoch"] < keep_epochs_below]
        rows.append(row)
        with atomic_path(self.metrics_path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def plot_curves(self, eval_split: str = "validation", force: bool = False) -> None:
        """Per epoch: task loss, accuracy in percent, and the recurrence penalty when it was on;
        training and `eval_split` ("validation" or "test") apart, EMA weights dashed; in the
        run's figure format (`curves.<figure_format>`), with a note when label smoothing makes
        the training loss higher than the evaluation loss. Drawn at most every CURVES_EVERY_S
        seconds (a figure costs about a second: one-second epochs would spend half their time
        drawing) and always for the last epoch and at `close`."""
        rows = self.read_metrics()
        config = self.config or {}
        last = bool(rows) and rows[-1]["epoch"] >= config.get("epochs", math.inf)
        if not (force or last) and time.monotonic() - self._curves_drawn < CURVES_EVERY_S:
            self._curves_pending = eval_split
            return
        self._curves_drawn, self._curves_pending = time.monotonic(), None
        if rows:
            path = figure_path(self.path / "curves", config.get("figure_format", "png"))
            save_figure(curves_figure({self.path.name: rows}, self.path.name, eval_split,
                                      curves_note(config, eval_split)), path)


def read_metrics(run_path: str | os.PathLike) -> list[dict]:
    """The per-epoch rows of a run's metrics.jsonl (none yet: an empty list)."""
    path = Path(run_path) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def local_device(device: torch.device, local_rank: int) -> torch.device:
    """This process's device: under torchrun on CUDA, GPU `local_rank` (made the current one)."""
    if device.type == "cuda" and os.environ.get("LOCAL_RANK") is not None:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def curves_note(config: dict, eval_split: str) -> str | None:
    """Why the training loss sits above the evaluation loss, when label smoothing is the reason."""
    smoothing = config.get("label_smoothing") or 0.0
    if not smoothing:
        return None
    return (f"Training loss is measured with label smoothing {smoothing:g} on augmented batches, the {eval_split} "
            f"loss without either: so the training loss is the higher one.")


SPLIT_STYLES = {"train": ("--", "o", "none"), "eval": ("-", "o", None), "ema": (":", "s", None)}


def curves_figure(runs: dict[str, list[dict]], title: str, eval_split: str = "validation",
                  note: str | None = None) -> Figure:
    """The figure of `RunDir.plot_curves` for one run, or several runs on shared axes: `runs`
    maps a label to its metrics rows. One run: a colour per split. Several: a colour per run, a
    line style per split (train dashed, `eval_split` solid, EMA dotted). `note` goes under the plots."""
    has_penalty = any(r.get("train_recurrence_penalty") is not None for rows in runs.values() for r in rows)
    fig = Figure(figsize=(13 if has_penalty else 10, 4.2 if note else 3.9), layout="constrained")
    axes = fig.subplots(1, 3 if has_penalty else 2, sharex=True)
    single = len(runs) == 1
    splits = [("train", "train"), ("val", eval_split), ("ema_val", f"{eval_split}, EMA weights")]
    accuracies = []
    for index, (label, rows) in enumerate(runs.items()):
        for prefix, split in splits:
            kind = "train" if prefix == "train" else "ema" if prefix.startswith("ema") else "eval"
            style, marker, face = SPLIT_STYLES[kind]
            colour = {"train": "tab:blue", "eval": "tab:orange", "ema": "tab:green"}[kind] if single else f"C{index}"
            name = split if single else f"{label}, {split}"
            for ax, key, scale in ((axes[0], f"{prefix}_loss", 1), (axes[1], f"{prefix}_acc", 100)):
                points = [(r["epoch"], r[key] * scale) for r in rows if r.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), style, marker=marker, ms=3.5, mfc=face, color=colour, label=name)
                    if scale == 100:
                        accuracies += [value for _, value in points]
            if has_penalty and prefix == "train":
                points = [(r["epoch"], r["train_recurrence_penalty"]) for r in rows
                          if r.get("train_recurrence_penalty") is not None]
                if points:
                    axes[2].plot(*zip(*points), "-", marker="o", ms=3.5, color=colour, label=label if not single else "train")
    axes[0].set(xlabel="epoch", ylabel="task loss", title="loss (without the regulariser)" if has_penalty else "loss")
    axes[1].set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    if accuracies:  # never a zoom that makes one example look like a cliff: at least 10 points shown
        low = max(0.0, min(min(accuracies) - 2, 90.0))
        axes[1].set_ylim(low - 0.5 if low else -1, 100.5)
    if has_penalty:
        axes[2].set(xlabel="epoch", ylabel="mean 1 - cos\u00b2", title="recurrence penalty", ylim=(0, None))
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0] and (single or ax is axes[1]):  # several runs: one legend
            ax.legend(fontsize=8)
    fig.suptitle(title)
    if note:
        fig.supxlabel(note, fontsize=8.5)
    return fig
