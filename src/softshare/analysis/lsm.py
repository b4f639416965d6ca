"""Layer Similarity Matrix figures: see which layers sharing a bank have become one layer.

The paper's signature result is that trained soft-shared nets develop blocks of (near)
collinear coefficient vectors, S_ij = |cos(a_i, a_j)| ~ 1. These helpers draw one heatmap per
bank on a fixed [0, 1] colour scale (so figures from different runs and epochs compare at a
glance), and keep a per-epoch history during training to watch the recurrence emerge.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

from ..errors import SoftshareError
from ..storage import atomic_path, save_figure, write_json, write_text
from ..wrappers import unwrap_model
from .similarity import LayerSimilarity, layer_similarity

LSM_DIR = "lsm"  # inside a run directory
HISTORY_FILE = "history.jsonl"
HISTORY_FIGURE = "history.png"
_MAX_ANNOTATED = 30  # beyond this many layers the numbers would be unreadable
_CMAP = "viridis"


def short_layer_names(names: Sequence[str]) -> list[str]:
    """Compact axis labels: ``stages.0.blocks.1.conv1`` -> ``b1.conv1``.

    Each ``word.N`` pair becomes ``wN`` and the dotted prefix common to all names is dropped
    (the bank already says where they are). Falls back to the uncollapsed names if collapsing
    makes two labels equal.
    """
    collapsed = [re.sub(r"(?<![\w])([A-Za-z])[A-Za-z_]*\.(\d+)", r"\1\2", name) for name in names]
    if len(set(collapsed)) < len(set(names)):
        collapsed = list(names)
    parts = [name.split(".") for name in collapsed]
    common = 0
    while parts and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


def _file_stem(bank: str) -> str:
    return "lsm_" + (re.sub(r"[^\w.-]+", "_", bank) or "bank")


def _annotation_size(n: int) -> float | None:
    if n > _MAX_ANNOTATED:
        return None
    return 9.0 if n <= 10 else 7.0 if n <= 18 else 5.0


def _label_step(n: int, side_inches: float, font_pt: float) -> int:
    """Label every k-th layer so that labels of `font_pt` never overlap on a `side_inches` axis."""
    cell_pt = 72.0 * side_inches / max(n, 1)
    return max(1, math.ceil(1.15 * font_pt / cell_pt))


def _draw(ax, similarity: LayerSimilarity, x_labels: bool, y_labels: bool, annotate: float | None,
          label_step: int = 1, font_pt: float = 8.0):
    """Heatmap of one bank's matrix on `ax` (fixed colour scale); returns the image. Layer names
    label every `label_step`-th row/column (ticks stay on every layer)."""
    matrix = similarity.matrix.numpy()
    n = len(similarity.layers)
    image = ax.imshow(matrix, cmap=_CMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    names = short_layer_names(similarity.layers)
    shown = [name if i % label_step == 0 else "" for i, name in enumerate(names)]
    ax.set_xticklabels(shown if x_labels else [], rotation=90, fontsize=font_pt)
    ax.set_yticklabels(shown if y_labels else [], fontsize=font_pt)
    if annotate:
        for i in range(n):
            for j in range(n):
                value = float(matrix[i, j])
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=annotate,
                        color="black" if value > 0.6 else "white")
    return image


def plot_lsm(similarities: Sequence[LayerSimilarity], out_dir: str | os.PathLike,
             title: str | None = None) -> list[Path]:
    """One heatmap PNG per bank, ``out_dir/lsm_<bank>.png``, values annotated up to 30 layers."""
    out_dir = Path(out_dir)
    paths = []
    for similarity in similarities:
        n = len(similarity.layers)
        side = max(3.5, 0.42 * n + 2.0)
        fig = Figure(figsize=(side + 1.0, side))
        ax = fig.add_subplot()
        image = _draw(ax, similarity, x_labels=True, y_labels=True, annotate=_annotation_size(n))  # 0.42 in a cell
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="|cos(a_i, a_j)|")
        ax.set_title(f"{title}: {similarity.bank}" if title else f"layer similarity, {similarity.bank}",
                     fontsize=10)
        paths.append(save_figure(fig, out_dir / f"{_file_stem(similarity.bank)}.png", dpi=110, bbox_inches="tight"))
    return paths


def _similarities(model: nn.Module) -> list[LayerSimilarity]:
    similarities = layer_similarity(unwrap_model(model))
    if not similarities:
        raise SoftshareError(
            f"{type(model).__name__} has no template banks, so it has no layer similarity matrix; "
            "use a soft-shared model (e.g. swrn_28_10_2) or convert one with softshare.share()")
    return similarities


def save_lsm(model: nn.Module, out_dir: str | os.PathLike) -> list[Path]:
    """Heatmaps of every bank of `model` plus ``lsm.json`` (the matrices) in `out_dir`."""
    similarities = _similarities(model)
    paths = plot_lsm(similarities, out_dir)
    json_path = Path(out_dir) / "lsm.json"
    write_json(json_path, {"banks": [s.to_dict() for s in similarities]})
    return [*paths, json_path]


# -- history during training ------------------------------------------------------------------
def read_lsm_history(run_dir: str | os.PathLike) -> list[dict]:
    """The records written by `record_lsm`: ``{"epoch": e, "banks": [LayerSimilarity dicts]}``."""
    path = Path(run_dir) / LSM_DIR / HISTORY_FILE
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise SoftshareError(f"{path} is corrupt ({err}); delete it to start a new LSM history") from None


def record_lsm(model: nn.Module, run_dir: str | os.PathLike, epoch: int) -> list[Path]:
    """Save the LSMs of `epoch` for a run: history line, per-epoch PNGs, refreshed history figure.

    For the trainer's ``--lsm-every N``. Records of epochs >= `epoch` are dropped first, so a
    resumed run does not duplicate the epochs it re-trains.
    """
    similarities = _similarities(model)
    lsm_dir = Path(run_dir) / LSM_DIR
    records = [r for r in read_lsm_history(run_dir) if r["epoch"] < epoch]
    records.append({"epoch": int(epoch), "banks": [s.to_dict() for s in similarities]})
    write_text(lsm_dir / HISTORY_FILE, "".join(json.dumps(r) + "\n" for r in records))
    epoch_dir = lsm_dir / f"epoch_{epoch:04d}"
    with atomic_path(epoch_dir) as tmp:
        plot_lsm(similarities, tmp, title=f"epoch {epoch}")
    return [lsm_dir / HISTORY_FILE, *sorted(epoch_dir.iterdir()), plot_lsm_history(run_dir)]


def _spread(count: int, limit: int) -> list[int]:
    """Up to `limit` evenly spaced indices into range(count), first and last included."""
    if count <= limit:
        return list(range(count))
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


def plot_lsm_history(run_dir: str | os.PathLike, max_columns: int = 8) -> Path:
    """Tiled figure ``run_dir/lsm/history.png``: rows are banks, columns evenly spaced epochs."""
    if max_columns < 2:
        raise SoftshareError(f"max_columns must be at least 2, got {max_columns}")
    records = read_lsm_history(run_dir)
    if not records:
        raise SoftshareError(f"no LSM history in {Path(run_dir) / LSM_DIR}; train with --lsm-every N first")
    records = [records[i] for i in _spread(len(records), max_columns)]
    banks = [bank["bank"] for bank in records[-1]["banks"]]
    rows, cols = len(banks), len(records)
    n_max = max(len(bank["layers"]) for record in records for bank in record["banks"])
    tile = max(1.8, min(0.3 * n_max + 0.8, 3.2 if n_max <= 16 else 5.0))
    fig = Figure(figsize=(tile * cols + 1.6, tile * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for col, record in enumerate(records):
        by_name = {bank["bank"]: bank for bank in record["banks"]}
        for row, name in enumerate(banks):
            ax = axes[row][col]
            bank = by_name.get(name)
            if bank is None:
                ax.set_axis_off()
                continue
            matrix = torch.tensor(bank["matrix"], dtype=torch.float64)
            similarity = LayerSimilarity(bank["bank"], bank["layers"], matrix)
            n = len(bank["layers"])
            image = _draw(ax, similarity, x_labels=row == rows - 1, y_labels=col == 0, annotate=6.0 if n <= 8 else None,
                          label_step=_label_step(n, tile, 7.0), font_pt=7.0)
            if col == 0:
                ax.set_ylabel(name, fontsize=9)
            if row == 0:
                ax.set_title(f"epoch {record['epoch']}", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.8, label="|cos(a_i, a_j)|")
    return save_figure(fig, Path(run_dir) / LSM_DIR / HISTORY_FIGURE, dpi=110, bbox_inches="tight")


__all__ = ["short_layer_names", "plot_lsm", "save_lsm", "record_lsm", "read_lsm_history", "plot_lsm_history"]
