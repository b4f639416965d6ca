"""Layer Similarity Matrix figures: see which layers sharing a bank have become one layer.

The paper's signature result is that trained soft-shared nets develop blocks of (near)
collinear coefficient vectors, S_ij = |cos(a_i, a_j)| ~ 1. These helpers draw one heatmap per
bank on a fixed [0, 1] colour scale (so figures from different runs and epochs compare at a
glance), and keep a per-epoch history during training to watch the recurrence emerge.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

from ..errors import SoftshareError
from ..storage import atomic_path, figure_path, save_figure, write_json, write_text
from ..wrappers import unwrap_model
from .similarity import LayerSimilarity, layer_similarity

LSM_DIR = "lsm"  # inside a run directory
HISTORY_FILE = "history.jsonl"
HISTORY_FIGURE = "history"  # + the figure format's suffix
NAMED_LAYERS = 12  # up to this many layers: names as ticks and the value in each cell; beyond, indices
_CMAP = "viridis"
COLOUR_LABEL = "$|\\cos(\\alpha_i, \\alpha_j)|$ of coefficient vectors\n(1: the same layer up to a scale)"


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


def bank_label(bank: str, layers: Sequence[str]) -> str:
    """A bank's name for a title: ``stages.0.bank`` -> ``stage 0``, ``banks.conv1`` -> ``conv1``; a
    bank `share()` made (held by its first layer) -> the module path its layers have in common."""
    path = [part for part in bank.split(".") if part not in ("bank", "banks")]
    if ".".join(path) in layers:  # held by one of its layers: name the group, not that layer
        split = [name.split(".") for name in layers]
        common = next((i for i in range(min(map(len, split))) if len({p[i] for p in split}) > 1),
                      min(map(len, split)))
        path = split[0][:common] or path
    words: list[str] = []
    for part in path:
        if part.isdigit() and words:  # stages.0 -> stage 0
            words[-1] = f"{words[-1][:-1] if words[-1].endswith('s') else words[-1]} {part}"
        else:
            words.append(part)
    return " ".join(words) or "bank"


def _file_stem(bank: str) -> str:
    return "lsm_" + (re.sub(r"[^\w.-]+", "_", bank) or "bank")


def _index_step(n: int, ticks: int = 8) -> int:
    """The first of 1, 2, 5, 10, 20, 50, ... giving at most `ticks` + 1 index ticks for n layers."""
    return next(step for step in (m * 10 ** e for e in range(12) for m in (1, 2, 5)) if (n - 1) // step <= ticks)


def _layer_axes(ax, names: list[str], x_labels: bool, y_labels: bool, font_pt: float, heatmap: bool = True) -> None:
    """Names as ticks up to NAMED_LAYERS layers, else layer indices (forward order) with the first
    and last names in the axis label."""
    n = len(names)
    if n <= NAMED_LAYERS:
        ticks, labels, axis = list(range(n)), names, None
    else:
        ticks = list(range(0, n, _index_step(n)))
        labels = [str(i) for i in ticks]
        axis = f"layer index (0: {names[0]}, {n - 1}: {names[-1]})"
    ax.set_xticks(ticks, labels if x_labels else [], rotation=90 if n <= NAMED_LAYERS else 0, fontsize=font_pt)
    if heatmap:
        ax.set_yticks(ticks, labels if y_labels else [], fontsize=font_pt)
    if axis and x_labels:
        ax.set_xlabel(axis, fontsize=font_pt)
    if axis and y_labels and heatmap:
        ax.set_ylabel("layer index", fontsize=font_pt)


def _draw(ax, similarity: LayerSimilarity, x_labels: bool = True, y_labels: bool = True, font_pt: float = 8.0,
          annotate: bool = True):
    """One bank on `ax`: its LSM heatmap on the fixed [0, 1] scale (values in the cells up to
    NAMED_LAYERS layers, if `annotate`), or for a bank of one template its layers' scales.
    Returns the image (None for scales)."""
    names = short_layer_names(similarity.layers)
    n = len(names)
    if similarity.scales is not None:
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.plot(range(n), similarity.scales, marker="o", ms=3 if n > NAMED_LAYERS else 4, color="tab:blue")
        ax.set_xlim(-0.5, n - 0.5)
        ax.set_ylabel("scale $c_i$", fontsize=font_pt)
        ax.grid(alpha=0.3)
        _layer_axes(ax, names, x_labels, y_labels, font_pt, heatmap=False)
        return None
    matrix = similarity.matrix.numpy()
    image = ax.imshow(matrix, cmap=_CMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
    _layer_axes(ax, names, x_labels, y_labels, font_pt)
    if annotate and n <= NAMED_LAYERS:
        size = 8.0 if n <= 8 else 6.5
        for i in range(n):
            for j in range(n):
                value = float(matrix[i, j])
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=size,
                        color="black" if value > 0.6 else "white")
    return image


def _title(similarity: LayerSimilarity) -> str:
    n = len(similarity.layers)
    label = bank_label(similarity.bank, similarity.layers)
    if similarity.scales is not None:
        return (f"{label}: {n} layers, one template, so layer i is $c_i T$\n"
                f"(every |cos| is 1 by construction; the scales are what differs)")
    return f"layer similarity, {label} ({n} layers)"


def plot_lsm(similarities: Sequence[LayerSimilarity], out_dir: str | os.PathLike,
             title: str | None = None, figure_format: str = "png") -> list[Path]:
    """One figure per bank, ``out_dir/lsm_<bank>.<format>``: its LSM heatmap (names and values up
    to 12 layers, layer indices beyond), or for a bank of one template its layers' scales."""
    out_dir = Path(out_dir)
    paths = []
    for similarity in similarities:
        n = len(similarity.layers)
        if similarity.scales is not None:
            fig = Figure(figsize=(max(5.0, 0.18 * n + 2.5), 3.4), layout="constrained")
            _draw(fig.add_subplot(), similarity)
        else:
            side = max(3.6, 0.5 * n + 1.6) if n <= NAMED_LAYERS else 5.2
            fig = Figure(figsize=(side + 1.6, side), layout="constrained")
            ax = fig.add_subplot()
            image = _draw(ax, similarity)
            fig.colorbar(image, ax=ax, shrink=0.85, label=COLOUR_LABEL).ax.yaxis.label.set_size(8)
        fig.suptitle(f"{title}: {_title(similarity)}" if title else _title(similarity), fontsize=10)
        paths.append(save_figure(fig, figure_path(out_dir / _file_stem(similarity.bank), figure_format)))
    return paths


def _similarities(model: nn.Module) -> list[LayerSimilarity]:
    similarities = layer_similarity(unwrap_model(model))
    if not similarities:
        raise SoftshareError(
            f"{type(model).__name__} has no template banks, so it has no layer similarity matrix; "
            "use a soft-shared model (e.g. swrn_28_10_2) or convert one with softshare.share()")
    return similarities


def save_lsm(model: nn.Module, out_dir: str | os.PathLike, figure_format: str = "png") -> list[Path]:
    """Figures of every bank of `model` (`plot_lsm`) plus ``lsm.json`` (the matrices) in `out_dir`."""
    similarities = _similarities(model)
    paths = plot_lsm(similarities, out_dir, figure_format=figure_format)
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


def record_lsm(model: nn.Module, run_dir: str | os.PathLike, epoch: int, figure_format: str = "png") -> list[Path]:
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
        plot_lsm(similarities, tmp, title=f"epoch {epoch}", figure_format=figure_format)
    return [lsm_dir / HISTORY_FILE, *sorted(epoch_dir.iterdir()), plot_lsm_history(run_dir, figure_format=figure_format)]


def _spread(count: int, limit: int) -> list[int]:
    """Up to `limit` evenly spaced indices into range(count), first and last included."""
    if count <= limit:
        return list(range(count))
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


def plot_lsm_history(run_dir: str | os.PathLike, max_columns: int = 8, figure_format: str = "png",
                     out_dir: str | os.PathLike | None = None) -> Path:
    """Tiled figure ``history.<format>`` in `out_dir` (default ``run_dir/lsm``): rows are banks,
    columns evenly spaced recorded epochs (the title says how many of how many, so no epoch is left
    out unsaid)."""
    if max_columns < 2:
        raise SoftshareError(f"max_columns must be at least 2, got {max_columns}")
    recorded = read_lsm_history(run_dir)
    if not recorded:
        raise SoftshareError(f"no LSM history in {Path(run_dir) / LSM_DIR}; train with --lsm-every N first")
    records = [recorded[i] for i in _spread(len(recorded), max_columns)]
    last = [LayerSimilarity.from_dict(bank) for bank in records[-1]["banks"]]
    rows, cols = len(last), len(records)
    n_max = max(len(bank["layers"]) for record in records for bank in record["banks"])
    tile = 2.0 if n_max <= 8 else 2.6
    fig = Figure(figsize=(tile * cols + 2.2, tile * rows + 1.0), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for col, record in enumerate(records):
        by_name = {bank["bank"]: LayerSimilarity.from_dict(bank) for bank in record["banks"]}
        for row, final in enumerate(last):
            ax = axes[row][col]
            similarity = by_name.get(final.bank)
            if similarity is None:
                ax.set_axis_off()
                continue
            drawn = _draw(ax, similarity, x_labels=row == rows - 1, y_labels=col == 0, font_pt=6.5,
                          annotate=len(similarity.layers) <= 8)
            image = drawn if drawn is not None else image
            if col == 0:
                ax.set_ylabel(bank_label(final.bank, final.layers), fontsize=9)
            if row == 0:
                ax.set_title(f"epoch {record['epoch']}", fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label=COLOUR_LABEL).ax.yaxis.label.set_size(8)
    epochs = [r["epoch"] for r in recorded]
    shown = (f"all {len(recorded)} recorded epochs" if cols == len(recorded) else
             f"{cols} of {len(recorded)} recorded epochs, evenly spaced (every one is in {LSM_DIR}/{HISTORY_FILE} "
             f"and {LSM_DIR}/epoch_NNNN/)")
    fig.suptitle(f"Layer similarity during training (epochs {epochs[0]}-{epochs[-1]}): {shown}", fontsize=10)
    out = Path(run_dir) / LSM_DIR if out_dir is None else Path(out_dir)
    return save_figure(fig, figure_path(out / HISTORY_FIGURE, figure_format))


__all__ = ["short_layer_names", "bank_label", "plot_lsm", "save_lsm", "record_lsm", "read_lsm_history", "plot_lsm_history"]
