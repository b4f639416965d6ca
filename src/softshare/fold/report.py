"""Fold reports and threshold sweeps: what folding costs in accuracy and saves in parameters."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from torch import nn

from ..storage import figure_path, save_figure, write_json, write_text
from ..progress import progress
from .core import FoldResult, count_parameters, fold_model, plan_loops
from .plan import check_threshold

log = logging.getLogger("softshare.fold")

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
    for threshold in progress(thresholds, "fold sweep", unit="threshold", log=log, every_s=10.0):
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
                metrics_before: Mapping[str, float] | None = None, figure_format: str = "png") -> list[Path]:
    """``fold_sweep.json``, ``fold_sweep.md`` (table) and ``fold_sweep.<format>`` (curves) in `out_dir`."""
    out_dir = Path(out_dir)
    metric = pick_metric(metrics_before) or pick_metric(rows[0].metrics if rows else None)
    write_json(out_dir / "fold_sweep.json", {"rule": GROUPING_RULE, "params_before": params_before,
                                             "metrics_before": dict(metrics_before or {}),
                                             "rows": [row.to_dict() for row in rows]})
    write_text(out_dir / "fold_sweep.md", sweep_table(rows, params_before, metric) + "\n")
    return [out_dir / "fold_sweep.json", out_dir / "fold_sweep.md",
            _plot_sweep(rows, figure_path(out_dir / "fold_sweep", figure_format), params_before, metrics_before,
                        metric)]


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
    return save_figure(sweep_figure(rows, params_before, metrics_before, metric), path)


def sweep_figure(rows: Sequence[SweepRow], params_before: int, metrics_before: Mapping[str, float] | None,
                 metric: str | None) -> Figure:
    """One axis. Evaluated: the trade-off itself, accuracy (%) against parameters, each point
    labelled with its threshold(s) and the original model starred; the accuracy range spans at
    least 10 points so one test example is not a cliff. Otherwise: parameters per threshold."""
    fig = Figure(figsize=(7, 4.4), layout="constrained")
    ax = fig.add_subplot()
    evaluated = [row for row in rows if metric and row.metrics and metric in row.metrics]
    if evaluated:
        scale, unit = (100.0, "%") if metric.endswith("acc") else (1.0, "")
        points: dict[tuple[int, float], list[str]] = {}  # thresholds folding to the same net coincide
        for row in evaluated:
            points.setdefault((row.params, row.metrics[metric] * scale), []).append(f"{row.threshold:g}")
        xs, ys = zip(*points)
        ax.plot(xs, ys, "o", color="tab:blue", label="folded (label: |cos| threshold)")
        for i, ((x, y), thresholds) in enumerate(sorted(points.items())):  # neighbours: above, below
            label = ", ".join(thresholds) if len(thresholds) <= 2 else f"{thresholds[-1]} to {thresholds[0]}"
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(0, 7 if i % 2 else -13), ha="center",
                        fontsize=8)
        values = list(ys)
        if metrics_before and metric in metrics_before:
            before = metrics_before[metric] * scale
            ax.plot([params_before], [before], "*", ms=13, color="tab:red", label="original (shared)")
            values.append(before)
        span = max(max(values) - min(values), 10.0 if scale == 100 else 0.0)
        middle = (max(values) + min(values)) / 2
        low, high = middle - 0.6 * span, middle + 0.6 * span
        if scale == 100:  # slide the window inside [0, 100] rather than cut it
            low, high = low - max(high - 100.0, 0.0), min(high, 100.0)
            low, high = max(low, 0.0), min(high + max(-low, 0.0), 100.0)
        if high > low:
            ax.set_ylim(low, high)
        ax.set_xlabel("parameters")
        ax.set_ylabel(f"accuracy, % ({metric})" if unit else metric)
        ax.set_xlim(0, max(max(xs), params_before) * 1.15)
    else:
        positions = range(len(rows))  # evenly spaced: 1.0 and 0.999 would overlap on a linear axis
        ax.plot(positions, [row.params for row in rows], "o-", color="tab:blue", label="folded")
        ax.axhline(params_before, color="tab:red", ls="--", lw=1, label="original (shared)")
        ax.set_xticks(list(positions), [f"{row.threshold:g}" for row in rows])
        ax.set_xlabel("|cos| threshold (looser to the right)")
        ax.set_ylabel("parameters")
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    if evaluated:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    ax.set_title("folding soft-shared blocks into loops")
    return fig
