"""Where metrics go besides `metrics.jsonl` (always written): CSV, TensorBoard, W&B.

Each sink gets the full list of rows after every epoch (resumed runs drop the rows of epochs
that are re-run), so a file sink simply rewrites itself and stays consistent with
metrics.jsonl; streaming sinks (TensorBoard, W&B) log the newest row, and also the training
loss and lr every `log_every` steps (`write_step`) and the run's config (TensorBoard: hparams).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ..errors import SoftshareError, import_optional
from ..storage import atomic_path
from .config_help import FIELD_CHOICES

LOGGERS = FIELD_CHOICES["logger"]  # jsonl (metrics.jsonl, always), csv, tensorboard, wandb


class MetricSink:
    """One destination of the per-epoch metrics."""

    def write(self, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def write_step(self, step: int, scalars: dict[str, float]) -> None:
        """Scalars of one training step (optimizer steps so far); epoch-level sinks ignore them."""

    def close(self) -> None:
        pass


class CsvSink(MetricSink):
    """`metrics.csv`: one row per epoch, one column per metric ever logged (blank where absent)."""

    def __init__(self, run_path: Path) -> None:
        self.path = run_path / "metrics.csv"

    def write(self, rows: list[dict[str, Any]]) -> None:
        columns: list[str] = []
        for row in rows:
            columns += [key for key in row if key not in columns]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        with atomic_path(self.path) as tmp:
            tmp.write_text(text.getvalue())


class TensorBoardSink(MetricSink):
    """Event files in `tensorboard/` (``tensorboard --logdir runs``): a scalar per metric, step = epoch,
    grouped as TensorBoard shows them best (``loss/train``, ``loss/val``, ``acc/train``...); per-step
    ``step/train_loss`` and ``step/lr`` against the optimizer step; the config as hparams and text.
    """

    def __init__(self, run_path: Path, config: dict[str, Any]) -> None:
        fix = "--logger tensorboard needs the tensorboard package: pip install 'softshare[tensorboard]' -c constraints.txt"
        tensorboard = import_optional("torch.utils.tensorboard", fix)
        hparams = import_optional("torch.utils.tensorboard.summary", fix).hparams
        self.writer = tensorboard.SummaryWriter(log_dir=str(run_path / "tensorboard"))
        values = {key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
                  for key, value in config.items()}
        for summary in hparams(values, {"acc/val": 0.0, "loss/val": 0.0}):  # the HPARAMS tab: config x result
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")

    def write_step(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(f"step/{key}", value, step)

    def write(self, rows: list[dict[str, Any]]) -> None:
        row = rows[-1]
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(scalar_tag(key), value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink(MetricSink):
    """A Weights & Biases run named after the run directory, config attached."""

    def __init__(self, run_path: Path, config: dict[str, Any]) -> None:
        wandb = import_optional("wandb", "--logger wandb needs the wandb package (pip install 'softshare[wandb]' "
                                         "-c constraints.txt) and a login (wandb login), or WANDB_MODE=offline")
        self.run = wandb.init(name=run_path.name, dir=str(run_path), config=config, resume="allow",
                              id=f"softshare-{run_path.name}")

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.run.log({scalar_tag(k) if k != "epoch" else k: v for k, v in rows[-1].items()})

    def write_step(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({"optimizer_step": step, **{f"step/{key}": value for key, value in scalars.items()}})

    def close(self) -> None:
        self.run.finish()


def scalar_tag(key: str) -> str:
    """``val_acc`` -> ``acc/val``, ``train_recurrence_penalty`` -> ``recurrence_penalty/train``."""
    for split in ("train", "val", "test", "ema_val", "ema_test"):
        if key.startswith(split + "_"):
            return f"{key[len(split) + 1:]}/{split}"
    return key


def make_sinks(names: list[str], run_path: Path, config: dict[str, Any]) -> list[MetricSink]:
    """The sinks for `names` (``jsonl`` is the run directory's own metrics.jsonl: no sink)."""
    unknown = [name for name in names if name not in LOGGERS]
    if unknown:
        raise SoftshareError(f"unknown logger {unknown[0]!r}; choose from {', '.join(LOGGERS)}")
    sinks: list[MetricSink] = []
    for name in dict.fromkeys(names):
        if name == "csv":
            sinks.append(CsvSink(run_path))
        elif name == "tensorboard":
            sinks.append(TensorBoardSink(run_path, config))
        elif name == "wandb":
            sinks.append(WandbSink(run_path, config))
    return sinks
