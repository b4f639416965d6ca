"""Figures of evaluation results, drawn with matplotlib's object API (no global backend)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from PIL import Image
from torch import Tensor, nn

from ..storage import atomic_path, save_figure


def _net_words(model: str) -> str:
    """``maze_recurrent`` -> ``recurrent net``: the body in words, not the registry name."""
    body = model.split("_", 1)[1] if model.startswith(("maze_", "prefix_")) else model
    return {"ff": "feed-forward net", "shared": "soft-shared net", "recurrent": "recurrent net"}.get(body, model)


def _size_words(task: str, size: int | str) -> str:
    return f"{size}x{size} mazes" if task == "mazes" else f"{size}-bit strings"


def plot_accuracy_vs_iterations(result: dict, path: Path) -> None:
    """One line per test size: exact match (%) against iterations run; a marker where the stable
    stopping rule stops on average (at the exact match it scores there)."""
    fig = Figure(figsize=(7.5, 4.4), layout="constrained")
    ax = fig.subplots()
    stops = result.get("stop", {})
    task = result["task"]
    for size, accuracy in result["accuracy"].items():
        line, = ax.plot(result["iterations"], [100 * a for a in accuracy], label=_size_words(task, size))
        stop = stops.get(size, {}).get("stable")
        if stop is not None:
            ax.plot(stop["mean_iteration"], 100 * stop["exact_match"], "o", color=line.get_color(), ms=6,
                    markeredgecolor="black", markeredgewidth=0.6)
    trained = result["trained_iterations"]
    ax.axvline(trained, color="grey", ls="--", lw=1, label=f"trained iterations ({trained})")
    if stops:
        ax.plot([], [], "o", color="white", markeredgecolor="black", label="where the stopping rule stops (mean)")
    ax.set(xlabel="iterations", ylabel="exact match (%)", ylim=(-2, 102),
           title=f"{_net_words(result['model'])} on {task.replace('-', ' ')}, trained on "
                 f"{_size_words(task, result['train_size'])}: thinking longer")
    if len(result["iterations"]) > 4 * trained:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    save_figure(fig, path)


# the maze figures: input with start and goal marked, target path, prediction against the target
START, GOAL = "#22c55e", "#ef4444"
CORRECT, MISSED, EXTRA = (1.0, 1.0, 1.0), (0.25, 0.55, 1.0), (1.0, 0.55, 0.1)


@dataclass
class MazeRow:
    """One maze of a figure: its input (3, H, W), target (H, W), predictions (iterations, H, W)."""

    label: str
    x: Tensor
    y: Tensor
    predictions: Tensor


def pick_mazes(examples: dict[int, tuple[Tensor, Tensor]], predictions: dict[int, Tensor], at: int) -> list[MazeRow]:
    """Per size, the first maze solved after `at` iterations and the first one not solved (either
    kind alone when there is no other), so a figure shows what the net gets right and wrong."""
    rows = []
    for size, (x, y) in examples.items():
        open_pixels = x.amax(dim=1) > 0
        solved = ((predictions[size][:, at - 1] == y.bool()) | ~open_pixels).flatten(1).all(dim=1)
        for kind, flag in (("solved", True), ("not solved", False)):
            index = next((i for i in range(len(x)) if bool(solved[i]) == flag), None)
            if index is not None:
                rows.append(MazeRow(f"{size}x{size}, {kind} after {_iterations(at)}", x[index], y[index],
                                    predictions[size][index]))
    return rows


def _iterations(count: int) -> str:
    return f"{count} iteration{'' if count == 1 else 's'}"


def _maze_rows(fig: Figure, rows: list[MazeRow], at: int) -> None:
    """A row per maze: input (start and goal ringed), target path, prediction after `at` iterations
    coloured against the target (walls masked: they do not count); a colour legend below."""
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for row, maze in zip(axes, rows):
        prediction = maze.predictions[at - 1].bool()
        target = maze.y.bool()
        open_pixels = maze.x.amax(dim=0) > 0
        picture = torch.zeros(*target.shape, 3)
        for mask, colour in ((prediction & target, CORRECT), (~prediction & target, MISSED),
                             (prediction & ~target & open_pixels, EXTRA)):
            picture[mask] = torch.tensor(colour)
        right = bool(((prediction == target) | ~open_pixels).all())
        row[0].imshow(maze.x.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        for channel, colour in ((1, START), (0, GOAL)):  # green start, red goal: ring them, visible at any size
            spot = (maze.x[channel] > 0.5) & (maze.x.sum(dim=0) < 1.5)
            if spot.any():
                rows_, cols_ = spot.nonzero(as_tuple=True)
                row[0].plot(cols_.float().mean(), rows_.float().mean(), "o", ms=11, mfc="none", mec=colour, mew=2.2)
        row[1].imshow(target.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        row[2].imshow(picture.numpy(), interpolation="nearest")
        row[0].set_title(maze.label.split(",")[0], fontsize=9)
        row[1].set_title("target path", fontsize=9)
        row[2].set_title(f"{_iterations(at)}: {'solved' if right else 'not solved'}", fontsize=9)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [Line2D([], [], ls="none", marker="o", ms=9, mfc="none", mec=START, mew=2, label="start"),
               Line2D([], [], ls="none", marker="o", ms=9, mfc="none", mec=GOAL, mew=2, label="goal"),
               Patch(facecolor=CORRECT, edgecolor="black", label="path, predicted"),
               Patch(facecolor=MISSED, edgecolor="black", label="path, missed"),
               Patch(facecolor=EXTRA, edgecolor="black", label="predicted, not the path")]
    fig.legend(handles=handles, loc="outside lower center", ncol=5, fontsize=8, frameon=False)


@torch.no_grad()
def maze_predictions(model: nn.Module, examples: dict[int, tuple[Tensor, Tensor]], iterations: int,
                     device: torch.device) -> dict[int, Tensor]:
    """Per size, the predicted paths (mazes, iterations, H, W) after every iteration, from one
    pass: what `pick_mazes`, `plot_maze_predictions` and `animate_maze_thinking` draw."""
    was_training = model.training
    model.eval()
    try:
        return {size: torch.stack([model(x[i:i + 1].to(device), iterations, return_all=True)[0].argmax(dim=1).bool()
                                   .cpu() for i in range(len(x))])  # one maze at a time: (iterations, C, H, W)
                for size, (x, _) in examples.items()}
    finally:
        model.train(was_training)


def plot_maze_predictions(rows: list[MazeRow], iterations: int, path: Path) -> None:
    """The mazes of `rows`: input, target path and the prediction after `iterations` iterations."""
    fig = Figure(figsize=(7.5, 2.5 * len(rows) + 0.4), layout="constrained")
    _maze_rows(fig, rows, iterations)
    save_figure(fig, path)


def animate_maze_thinking(rows: list[MazeRow], path: Path, frames: int = 40, ms_per_frame: int = 150) -> Path:
    """A GIF of the same rows iteration by iteration (`frames` frames spread over all the predictions'
    iterations, the last held): watch the path form, and whether it holds past the trained count.
    Frames are drawn off-screen (Agg canvas of a Figure) and written atomically with Pillow."""
    iterations = len(rows[0].predictions)
    steps = sorted({int(t) for t in np.linspace(1, iterations, min(frames, iterations)).round()})
    images = []
    for t in steps:
        fig = Figure(figsize=(7.5, 2.5 * len(rows) + 0.4), dpi=70, layout="constrained")
        canvas = FigureCanvasAgg(fig)
        _maze_rows(fig, rows, t)
        canvas.draw()
        images.append(Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB"))
    durations = [ms_per_frame] * (len(images) - 1) + [ms_per_frame * 10]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    return Path(path)
