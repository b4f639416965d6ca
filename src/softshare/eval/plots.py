"""Figures of evaluation results, drawn with matplotlib's object API (no global backend)."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from ..io import save_figure


def plot_accuracy_vs_iterations(result: dict, path: Path) -> None:
    """One line per test size: exact match (%) against iterations run; a marker where the stable
    stopping rule stops on average (at the exact match it scores there)."""
    fig = Figure(figsize=(7, 4.2), layout="tight")
    ax = fig.subplots()
    stops = result.get("stop", {})
    for size, accuracy in result["accuracy"].items():
        line, = ax.plot(result["iterations"], [100 * a for a in accuracy], label=f"size {size}")
        stop = stops.get(size, {}).get("stable")
        if stop is not None:
            ax.plot(stop["mean_iteration"], 100 * stop["exact_match"], "o", color=line.get_color(), ms=6,
                    markeredgecolor="black", markeredgewidth=0.6)
    ax.axvline(result["trained_iterations"], color="grey", ls="--", lw=1, label="trained iterations")
    if stops:
        ax.plot([], [], "o", color="white", markeredgecolor="black", label="stable rule stops (mean)")
    ax.set(xlabel="iterations", ylabel="exact match (%)", ylim=(-2, 102),
           title=f"{result['model']} ({result['task']}, trained at {result['train_size']})")
    if len(result["iterations"]) > 4 * result["trained_iterations"]:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    save_figure(fig, path)


@torch.no_grad()
def plot_maze_predictions(model: nn.Module, examples: dict[int, tuple[Tensor, Tensor]], iterations: int,
                          path: Path, device: torch.device) -> None:
    """One maze per size: input, target path and the prediction after `iterations` iterations."""
    was_training = model.training
    model.eval()
    fig = Figure(figsize=(7.5, 2.5 * len(examples)), layout="tight")
    axes = fig.subplots(len(examples), 3, squeeze=False)
    for row, (size, (x, y)) in zip(axes, examples.items()):
        logits = model(x.to(device), iterations)
        prediction = logits.argmax(dim=1)[0].cpu()
        open_pixels = x[0].amax(dim=0) > 0
        right = bool(((prediction == y[0]) | ~open_pixels).all())
        row[0].imshow(x[0].permute(1, 2, 0).clamp(0, 1).numpy())
        row[1].imshow(y[0].numpy(), cmap="gray", vmin=0, vmax=1)
        row[2].imshow((prediction * open_pixels).numpy(), cmap="gray", vmin=0, vmax=1)  # walls do not count
        row[0].set_title(f"maze {size}x{size}", fontsize=9)
        row[1].set_title("target path", fontsize=9)
        row[2].set_title(f"prediction, {iterations} iterations ({'solved' if right else 'wrong'})", fontsize=9)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    model.train(was_training)
    save_figure(fig, path)
