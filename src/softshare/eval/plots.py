"""Figures of evaluation results, drawn with matplotlib's object API (no global backend)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from ..io import save_figure


def plot_accuracy_vs_iterations(result: dict, path: Path) -> None:
    """One line per test size: exact match against the number of iterations run."""
    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.subplots()
    for size, accuracy in result["accuracy"].items():
        ax.plot(result["iterations"], [100 * a for a in accuracy], label=f"size {size}")
    ax.axvline(result["trained_iterations"], color="grey", ls="--", lw=1, label="trained iterations")
    ax.set(xlabel="iterations", ylabel="exact match (%)", ylim=(-2, 102),
           title=f"{result['model']} ({result['task']}, trained at {result['train_size']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
