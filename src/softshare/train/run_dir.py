"""The run directory: whose it is and owning it for a run (lock, leftovers of a killed writer),
config, provenance, per-epoch metrics, curves, log.

A directory is a run only by proof: the output marker softshare writes into every run (kind
"run"), or, for runs of versions before markers, a config.json holding exactly a training
config together with softshare's run_info.json or checkpoint metadata. What a directory holds
(`checkpoints/`, a `config.json`) never makes it one, so a user's project is never trained into,
and advice to resume is given only for a proven run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
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

from ..checkpoint import META_FILE, read_meta
from ..device import device_description
from ..errors import SoftshareError
from ..storage import (LOCK_FILE, OUTPUT_MARKER, atomic_path, check_writable, exclusive_lock, figure_path,
                       mark_output, output_kind, recover_leftovers, save_figure, write_json)
from ..version import __version__
from .config import TrainConfig

log = logging.getLogger("softshare.train")
CURVES_EVERY_S = 10.0  # the least time between two drawings of a run's curves figure
RUN_KIND = "run"
# What a run writes into its directory (--overwrite deletes these before starting afresh; any
# other file there is the user's and stays): the trainer's files, its loggers', and what
# `softshare eval`, `lsm` and the studies add to a run.
RUN_ENTRIES = ("config.json", "run_info.json", "metrics.jsonl", "metrics.csv", "train.log", "curves.*",
               "checkpoints", "lsm", "split.json", "data.json", "classes.json", "tensorboard", "eval-*",
               "study-*.json", "lsm-evaluated", OUTPUT_MARKER)
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def is_run(path: str | os.PathLike) -> bool:
    """Whether `path` is a softshare run directory, by proof (see the module docstring)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    kind = output_kind(path)
    if kind is not None:
        return kind == RUN_KIND
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or not config or not set(config) <= _CONFIG_FIELDS \
            or not {"task", "model", "epochs"} <= set(config):
        return False
    try:
        info = json.loads((path / "run_info.json").read_text())
        if isinstance(info, dict) and "softshare_version" in info:
            return True
    except (OSError, ValueError):
        pass
    for which in ("last", "best"):
        try:
            if (path / "checkpoints" / which / META_FILE).is_file() and read_meta(path / "checkpoints" / which):
                return True
        except SoftshareError:
            continue
    return False


def _fresh_hint(path: Path) -> str:
    return f"choose another --name or --out-dir, or pass --overwrite to train into {path} anyway"


@contextlib.contextmanager
def own_run_dir(run_path: Path, *, continuing: bool, overwrite: bool = False) -> Iterator[None]:
    """Check `run_path` may be trained into, then hold its lock for the whole run and finish what
    a killed writer left there.

    A new or empty directory may always be; a proven run only when `continuing` it (resume), or
    started afresh with `overwrite`; anything else (a user's directory, whatever it holds) only
    with `overwrite`, and then only the run's own entries are ever replaced. Nothing is left
    behind if the run fails before writing: the directories created here (the run's, and the
    --out-dir folders made for it) are removed, a lock file created here too.
    """
    if os.path.lexists(run_path) and (not run_path.is_dir() or run_path.is_symlink()):
        what = "a symbolic link" if run_path.is_symlink() else "a file"
        raise SoftshareError(f"cannot train into {run_path}: it is {what}, not a directory; choose another --name "
                             f"or --out-dir")
    if continuing and overwrite:
        raise SoftshareError("--overwrite starts a run afresh, --resume continues one: give one of them")
    occupied = run_path.is_dir() and any(p.name != LOCK_FILE for p in run_path.iterdir())
    if occupied and not overwrite:
        if not is_run(run_path):
            raise SoftshareError(f"refusing to train into {run_path}: it holds files softshare did not write there "
                                 f"(it is not a softshare run directory); {_fresh_hint(run_path)} (only the files a "
                                 f"run writes are replaced)")
        if not continuing:
            raise SoftshareError(f"run directory {run_path} already holds a run; continue it with --resume auto, "
                                 f"start it afresh with --overwrite (its checkpoints and metrics are deleted), or "
                                 f"pick another --name")
    check_writable(run_path)
    created = [folder for folder in (run_path, *run_path.parents) if not folder.exists()]  # innermost first
    locked_before = (run_path / LOCK_FILE).exists()
    try:
        run_path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SoftshareError(f"cannot write run directory {run_path}: {err.strerror}; "
                             f"choose another --out-dir or fix its permissions") from None
    try:
        with exclusive_lock(run_path, "run directory", "wait for it to finish or stop it; one process "
                                                       "trains a run at a time"):
            if is_run(run_path):
                for folder in (run_path, run_path / "checkpoints", run_path / "lsm"):
                    for done in recover_leftovers(folder):
                        log.info("%s", done)
            yield
    finally:
        left = [p.name for p in run_path.iterdir()] if run_path.is_dir() else []
        if left == [LOCK_FILE] and created:
            shutil.rmtree(run_path, ignore_errors=True)  # failed before writing anything
            for folder in created[1:]:  # and the --out-dir folders made for it, unless something else is there now
                try:
                    folder.rmdir()
                except OSError:
                    break
        elif LOCK_FILE in left and not locked_before and not is_run(run_path):
            with contextlib.suppress(FileNotFoundError):
                (run_path / LOCK_FILE).unlink()


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


class RunDir:
    """Paths and writers of `runs/<name>/`. Only rank 0 constructs one, after everything was
    validated: from here on the directory is written (`afresh`: the run's own entries of an
    earlier run there are deleted first, the user's other files stay)."""

    def __init__(self, path: Path, afresh: bool = False) -> None:
        self.path = path
        try:
            path.mkdir(parents=True, exist_ok=True)
            if afresh:
                for entry in path.iterdir():
                    if any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in RUN_ENTRIES):
                        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            if output_kind(path) != RUN_KIND:
                mark_output(path, RUN_KIND, files=())  # its entries: RUN_ENTRIES
        except OSError as err:
            raise SoftshareError(f"cannot write run directory {path}: {err.strerror}; "
                                 f"choose another --out-dir or fix its permissions") from None
        self.checkpoints = path / "checkpoints"
        self.metrics_path = path / "metrics.jsonl"
        self.config: dict | None = None  # the resolved config, once `write_info` has written it
        self._curves_drawn = -math.inf  # time.monotonic() of the last curves figure
        self._curves_pending = False  # an epoch not drawn yet
        self._attach_log()

    def _attach_log(self) -> None:
        handler = logging.FileHandler(self.path / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        self._handler = handler

    def close(self) -> None:
        if self._curves_pending:  # the last epochs came too fast to draw: draw them now
            self.plot_curves(force=True)
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

    def plot_curves(self, eval_split: str | None = None, force: bool = False) -> None:
        """Per epoch: task loss, accuracy in percent, and the recurrence penalty when it was on;
        training and the evaluated split (validation, or test with val_size 0: named by the rows'
        `val_`/`test_` keys unless `eval_split` says) apart, EMA weights dashed; in the run's
        figure format (`curves.<figure_format>`), with a note when label smoothing makes the
        training loss higher than the evaluation loss. Drawn at most every CURVES_EVERY_S seconds
        (a figure costs about a second: one-second epochs would spend half their time drawing) and
        always for the last epoch and at `close`."""
        rows = self.read_metrics()
        config = self.config or {}
        last = bool(rows) and rows[-1]["epoch"] >= config.get("epochs", math.inf)
        if not (force or last) and time.monotonic() - self._curves_drawn < CURVES_EVERY_S:
            self._curves_pending = True
            return
        self._curves_drawn, self._curves_pending = time.monotonic(), False
        if rows:
            path = figure_path(self.path / "curves", config.get("figure_format", "png"))
            split = eval_split or SPLITS[eval_prefix(rows)]
            save_figure(curves_figure({self.path.name: rows}, self.path.name, eval_split,
                                      curves_note(config, split)), path)


def read_metrics(run_path: str | os.PathLike) -> list[dict]:
    """The per-epoch rows of a run's metrics.jsonl (none yet: an empty list); a file that is not
    what the trainer writes is one clear error."""
    path = Path(run_path) / "metrics.jsonl"
    if not path.exists():
        return []
    fix = ("restore it from a backup, or delete it (the checkpoints are intact; the file is written again from "
           "the next epoch on)")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SoftshareError(f"cannot read {path} ({err}); {fix}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise SoftshareError(f"{path} line {number} is not a row of per-epoch metrics (a JSON object with an "
                                 f"integer epoch); {fix}")
        rows.append(row)
    return rows


def local_device(device: torch.device, local_rank: int) -> torch.device:
    """This process's device: under torchrun on CUDA, GPU `local_rank` (made the current one)."""
    if device.type == "cuda" and os.environ.get("LOCAL_RANK") is not None:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


SPLITS = {"val": "validation", "test": "test"}  # metric prefix -> what the curves call it


def eval_prefix(rows: list[dict]) -> str:
    """The prefix of the evaluated split's metrics in `rows`: ``val`` (a validation split), or
    ``test`` (a run with val_size 0; runs before the split was named recorded ``val`` for both)."""
    return "val" if any(k.startswith(("val_", "ema_val_")) for r in rows for k in r) else "test"


def curves_note(config: dict, eval_split: str) -> str | None:
    """Why the training loss sits above the evaluation loss, when label smoothing is the reason."""
    smoothing = config.get("label_smoothing") or 0.0
    if not smoothing:
        return None
    return (f"Training loss is measured with label smoothing {smoothing:g} on augmented batches, the {eval_split} "
            f"loss without either: so the training loss is the higher one.")


SPLIT_STYLES = {"train": ("--", "o", "none"), "eval": ("-", "o", None), "ema": (":", "s", None)}


def curves_figure(runs: dict[str, list[dict]], title: str, eval_split: str | None = None,
                  note: str | None = None) -> Figure:
    """The figure of `RunDir.plot_curves` for one run, or several runs on shared axes: `runs`
    maps a label to its metrics rows. One run: a colour per split. Several: a colour per run, a
    line style per split (train dashed, the evaluated split solid, EMA dotted). Each run's
    evaluated split is read from its `val_` or `test_` keys and named so unless `eval_split`
    names it (runs recorded before that split was named). `note` goes under the plots."""
    has_penalty = any(r.get("train_recurrence_penalty") is not None for rows in runs.values() for r in rows)
    fig = Figure(figsize=(13 if has_penalty else 10, 4.2 if note else 3.9), layout="constrained")
    axes = fig.subplots(1, 3 if has_penalty else 2, sharex=True)
    single = len(runs) == 1
    accuracies = []
    for index, (label, rows) in enumerate(runs.items()):
        evaluated = eval_prefix(rows)
        named = eval_split or SPLITS[evaluated]
        splits = [("train", "train"), (evaluated, named), (f"ema_{evaluated}", f"{named}, EMA weights")]
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
