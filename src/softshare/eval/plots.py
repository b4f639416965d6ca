"""Figures of evaluation results, drawn with matplotlib's object API (no global backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor, nn

from ..storage import atomic_path, save_figure


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


def _maze_rows(fig: Figure, examples: dict[int, tuple[Tensor, Tensor]], predictions: dict[int, Tensor],
               iterations: int) -> None:
    """One row per size: input, target path, prediction (walls masked: they do not count)."""
    axes = fig.subplots(len(examples), 3, squeeze=False)
    for row, (size, (x, y)) in zip(axes, examples.items()):
        prediction = predictions[size]
        open_pixels = x[0].amax(dim=0) > 0
        right = bool(((prediction == y[0]) | ~open_pixels).all())
        row[0].imshow(x[0].permute(1, 2, 0).clamp(0, 1).numpy())
        row[1].imshow(y[0].numpy(), cmap="gray", vmin=0, vmax=1)
        row[2].imshow((prediction * open_pixels).numpy(), cmap="gray", vmin=0, vmax=1)
        row[0].set_title(f"maze {size}x{size}", fontsize=9)
        row[1].set_title("target path", fontsize=9)
        row[2].set_title(f"prediction, {iterations} iterations ({'solved' if right else 'wrong'})", fontsize=9)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])


@torch.no_grad()
def maze_predictions(model: nn.Module, examples: dict[int, tuple[Tensor, Tensor]], iterations: int,
                     device: torch.device) -> dict[int, Tensor]:
    """Per size, the predicted path (iterations, H, W) after every iteration, from one pass: what
    `plot_maze_predictions` and `animate_maze_thinking` draw."""
    was_training = model.training
    model.eval()
    try:
        return {size: model(x.to(device), iterations, return_all=True)[0].argmax(dim=1).cpu()
                for size, (x, _) in examples.items()}
    finally:
        model.train(was_training)


def plot_maze_predictions(examples: dict[int, tuple[Tensor, Tensor]], predictions: dict[int, Tensor],
                          iterations: int, path: Path) -> None:
    """One maze per size: input, target path and the prediction after `iterations` iterations."""
    fig = Figure(figsize=(7.5, 2.5 * len(examples)), layout="tight")
    _maze_rows(fig, examples, {size: p[iterations - 1] for size, p in predictions.items()}, iterations)
    save_figure(fig, path)


def animate_maze_thinking(examples: dict[int, tuple[Tensor, Tensor]], predictions: dict[int, Tensor], path: Path,
                          frames: int = 40, ms_per_frame: int = 150) -> Path:
    """A GIF of the same rows iteration by iteration (`frames` frames spread over all the predictions'
    iterations, the last held): watch the path form, and whether it holds past the trained count.
    Frames are drawn off-screen (Agg canvas of a Figure) and written atomically with Pillow."""
    iterations = len(next(iter(predictions.values())))
    steps = sorted({int(t) for t in np.linspace(1, iterations, min(frames, iterations)).round()})
    images = []
    for t in steps:
        fig = Figure(figsize=(7.5, 2.5 * len(examples)), dpi=60, layout="tight")
        canvas = FigureCanvasAgg(fig)
        _maze_rows(fig, examples, {size: p[t - 1] for size, p in predictions.items()}, t)
        canvas.draw()
        images.append(Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB"))
    durations = [ms_per_frame] * (len(images) - 1) + [ms_per_frame * 10]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    return Path(path)
