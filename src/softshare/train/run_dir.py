"""The run directory: config, provenance, per-epoch metrics, curves, log."""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import SoftshareError
from ..io import atomic_path, write_json

log = logging.getLogger("softshare.train")


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


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


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
        self._attach_log()

    def _attach_log(self) -> None:
        handler = logging.FileHandler(self.path / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        self._handler = handler

    def close(self) -> None:
        log.removeHandler(self._handler)
        self._handler.close()

    def write_info(self, config: dict, device: torch.device, world_size: int) -> None:
        from .. import __version__

        write_json(self.path / "config.json", config)
        write_json(self.path / "run_info.json", {
            "softshare_version": __version__, "git_commit": git_commit(), "torch_version": torch.__version__,
            "python": platform.python_version(), "device": device_description(device),
            "world_size": world_size, "host": socket.gethostname(), "argv": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def append_metrics(self, row: dict[str, Any], keep_epochs_below: int | None = None) -> None:
        """Append one epoch's metrics; on resume, drop rows of epochs that will be re-run."""
        rows = self.read_metrics()
        if keep_epochs_below is not None:
            rows = [r for r in rows if r["epoch"] < keep_epochs_below]
        rows.append(row)
        with atomic_path(self.metrics_path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def plot_curves(self) -> None:
        """Loss and accuracy per epoch, train and validation, refreshed every epoch."""
        rows = self.read_metrics()
        if not rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in rows]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        for key, label, ax in (("train_loss", "train", ax_loss), ("val_loss", "eval", ax_loss),
                               ("train_acc", "train", ax_acc), ("val_acc", "eval", ax_acc)):
            points = [(e, r[key]) for e, r in zip(epochs, rows) if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, label=label)
        ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
        ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(self.path.name)
        fig.tight_layout()
        with atomic_path(self.path / "curves.png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise SoftshareError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SoftshareError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return device


def local_device(spec: str, local_rank: int) -> torch.device:
    device = resolve_device(spec)
    if device.type == "cuda" and os.environ.get("LOCAL_RANK") is not None:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device
