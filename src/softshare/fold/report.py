"""Fold reports and threshold sweeps: what folding costs in accuracy and saves in parameters."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from torch import nn

from ..io import save_figure, write_json, write_text
from .core import FoldResult, count_parameters, fold_model, plan_loops
from .plan import check_threshold

Evaluator = Callable[[nn.Module], Mapping[str, float]]
DEFAULT_THRESHOLDS = (1.0, 0.999, 0.99, 0.98, 0.95, 0.9, 0.8)
GROUPING_RULE = ("consecutive blocks fold into one loop when every pair of them has |cos| >= threshold "
                 "between their coefficient vectors, for every shared layer of the block")


def _metric_table(metrics: Mapping[str, Mapping[str, float]]) -> list[str]:
    keys = list(dict.fromkeys(k for values in metrics.values() for k in values))
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label, values in metrics.items():
        cells = [_number(values.get(k)) for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _number(value) -> str:
    if value is None:
        return ""
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"


def write_fold_report(result: FoldResult, out_dir: str | os.PathLike, source: str | None = None,
                      metrics: Mapping[str, Mapping[str, float]] | None = None) -> list[Path]:
    """``fold_report.json`` and ``fold_report.md`` in `out_dir`.

    `metrics` maps a label ("original", "folded", ...) to that model's evaluation, if any.
    """
    out_dir = Path(out_dir)
    report = {"source": source, "rule": GROUPING_RULE, **result.to_dict(), "metrics": dict(metrics or {})}
    write_json(out_dir / "fold_report.json", report)
    ratio = result.params_after / result.params_before
    lines = [
        "# Fold report", "",
        *([f"- source: `{source}`"] if source else []),
        f"- threshold: {result.threshold} ({GROUPING_RULE})",
        f"- parameters: {result.params_before:,} before, {result.params_after:,} after ({ratio:.3f}x); "
        f"{result.params_unshared:,} without sharing (blocks that do not fold are materialised)",
        f"- loops per site: {result.loops}", "",
        "| site | blocks | loop length | min pair \\|cos\\| | fit error | scales c_t |",
        "|---|---|---|---|---|---|",
    ]
    for g in result.groups:
        scales = "; ".join(f"{role}: " + ", ".join(f"{c:.3g}" for c in cs) for role, cs in g.scales.items())
        kind = str(g.length) if g.length > 1 else "1 (not folded)"
        lines.append(f"| {g.container} | {', '.join(map(str, g.blocks))} | {kind} | {g.min_similarity:.4f} "
                     f"| {g.fit_error:.2e} | {scales} |")
    if metrics:
        lines += ["", "## Evaluation", "", *_metric_table(metrics)]
    write_text(out_dir / "fold_report.md", "\n".join(lines) + "\n")
    return [out_dir / "fold_report.json", out_dir / "fold_report.md"]


@dataclass
class SweepRow:
    threshold: float
    loops: list[list[int]]
    params: int
    metrics: dict[str, float] | None

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "loops": self.loops, "params": self.params, "metrics": self.metrics}


def sweep(model: nn.Module, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
          evaluate: Evaluator | None = None) -> list[SweepRow]:
    """Fold at each threshold; thresholds giving the same loops are folded and evaluated once."""
    for threshold in thresholds:
        check_threshold(threshold)
    done: dict[str, tuple[int, dict | None]] = {}
    rows = []
    for threshold in thresholds:
        loops = plan_loops(model, threshold)
        key = json.dumps(loops)
        if key not in done:
            folded = fold_model(model, threshold).model
            done[key] = (count_parameters(folded), dict(evaluate(folded)) if evaluate else None)
        rows.append(SweepRow(threshold, loops, *done[key]))
    return rows


def pick_metric(metrics: Mapping[str, float] | None) -> str | None:
    """The accuracy-like key to plot: val_acc, acc, or the first key ending in 'acc'."""
    if not metrics:
        return None
    for key in ("val_acc", "acc"):
        if key in metrics:
            return key
    return next((key for key in metrics if key.endswith("acc")), None)


def write_sweep(rows: Sequence[SweepRow], out_dir: str | os.PathLike, params_before: int,
                metrics_before: Mapping[str, float] | None = None) -> list[Path]:
    """``fold_sweep.json``, ``fold_sweep.md`` (table) and ``fold_sweep.png`` (curves) in `out_dir`."""
    out_dir = Path(out_dir)
    metric = pick_metric(metrics_before) or pick_metric(rows[0].metrics if rows else None)
    write_json(out_dir / "fold_sweep.json", {"rule": GROUPING_RULE, "params_before": params_before,
                                             "metrics_before": dict(metrics_before or {}),
                                             "rows": [row.to_dict() for row in rows]})
    write_text(out_dir / "fold_sweep.md", sweep_table(rows, params_before, metric) + "\n")
    return [out_dir / "fold_sweep.json", out_dir / "fold_sweep.md",
            _plot_sweep(rows, out_dir / "fold_sweep.png", params_before, metrics_before, metric)]


def sweep_table(rows: Sequence[SweepRow], params_before: int, metric: str | None = None) -> str:
    """Markdown table: threshold, loops, parameters (and their ratio), the metric if evaluated."""
    head = ["threshold", "loops per site", "parameters", "vs original"] + ([metric] if metric else [])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in rows:
        cells = [f"{row.threshold:g}", str(row.loops), f"{row.params:,}", f"{row.params / params_before:.3f}x"]
        if metric:
            cells.append(_number((row.metrics or {}).get(metric)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_sweep(rows: Sequence[SweepRow], path: Path, params_before: int,
                metrics_before: Mapping[str, float] | None, metric: str | None) -> Path:
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    positions = range(len(rows))  # evenly spaced: 1.0 and 0.999 would overlap on a linear axis
    ax.plot(positions, [row.params for row in rows], "o-", color="tab:blue", label="parameters (folded)")
    ax.axhline(params_before, color="tab:blue", ls="--", lw=1, label="parameters (original)")
    ax.set_xticks(list(positions), [f"{row.threshold:g}" for row in rows])
    ax.set_xlabel("similarity threshold (looser to the right)")
    ax.set_ylabel("parameters", color="tab:blue")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    if metric and any(row.metrics and metric in row.metrics for row in rows):
        twin = ax.twinx()
        points = [(i, row.metrics[metric]) for i, row in enumerate(rows) if row.metrics and metric in row.metrics]
        twin.plot(*zip(*points), "s-", color="tab:red", label=f"{metric} (folded)")
        if metrics_before and metric in metrics_before:
            twin.axhline(metrics_before[metric], color="tab:red", ls=":", lw=1, label=f"{metric} (original)")
        twin.set_ylabel(metric, color="tab:red")
        twin_handles = twin.get_legend_handles_labels()
        handles = (handles[0] + twin_handles[0], handles[1] + twin_handles[1])
    ax.legend(*handles, loc="lower left", fontsize=8)
    ax.set_title("folding soft-shared blocks into loops")
    return save_figure(fig, path, dpi=110)
