"""How a shared net's coefficients move in training: is recurrence appearing, or is it drift?

Read from the LSM history (`record_lsm` keeps each epoch's coefficient vectors), per bank and
epoch: how similar consecutive layers are (what folding needs), each layer's nearest other layer,
how far each vector has turned from where it started, and the vectors' norms. `random_similarity`
is the control: the |cos| that k-dimensional vectors pointing anywhere would show, so a number
is read against what chance gives.
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..errors import SoftshareError
from ..storage import figure_path, save_figure
from .lsm import bank_label, read_lsm_history
from .similarity import abs_cosine

DYNAMICS_FIGURE = "dynamics"  # + the figure format's suffix
FOLD_LEVELS = (0.9, 0.95, 0.99)


def bank_dynamics(vectors: torch.Tensor, start: torch.Tensor | None) -> dict[str, float]:
    """Summary of one bank's (n, k) coefficient vectors, against their (n, k) `start` if given."""
    similarity = abs_cosine(vectors.double())
    n = similarity.shape[0]
    consecutive = similarity.diagonal(offset=1) if n > 1 else torch.ones(1, dtype=torch.float64)
    others = similarity.masked_fill(torch.eye(n, dtype=torch.bool), -1.0)
    nearest = others.amax(dim=1) if n > 1 else torch.ones(1, dtype=torch.float64)
    norms = vectors.double().norm(dim=1)
    summary = {
        "consecutive_mean": float(consecutive.mean()),
        "consecutive_min": float(consecutive.min()),
        "nearest_mean": float(nearest.mean()),
        "offdiagonal_mean": float(others[others >= 0].mean()) if n > 1 else 1.0,
        "norm_mean": float(norms.mean()),
        "norm_std": float(norms.std()) if n > 1 else 0.0,
        **{f"consecutive_at_{level}": float((consecutive >= level).double().mean()) for level in FOLD_LEVELS},
    }
    if start is not None:
        turned = torch.nn.functional.cosine_similarity(vectors.double(), start.double(), dim=1).abs()
        summary["cos_to_start_mean"] = float(turned.mean())
    return summary


def coefficient_dynamics(run_dir: str | os.PathLike) -> list[dict]:
    """Per recorded epoch: ``{"epoch", "banks": {bank: bank_dynamics(...)}}`` from the LSM history.

    The first record with coefficients is the reference for how far vectors turned (record the
    start with ``--lsm-every``: the trainer writes epoch 0 before the first step).
    """
    records = [r for r in read_lsm_history(run_dir) if all("coefficients" in b for b in r["banks"])]
    if not records:
        raise SoftshareError(f"no coefficient history in {Path(run_dir)}: train a shared net with --lsm-every N "
                             f"(runs from before coefficients were recorded hold only the matrices)")
    start = {b["bank"]: torch.tensor(b["coefficients"]) for b in records[0]["banks"]}
    return [{"epoch": r["epoch"],
             "banks": {b["bank"]: bank_dynamics(torch.tensor(b["coefficients"]), start.get(b["bank"]))
                       for b in r["banks"]}}
            for r in records]


def random_similarity(n: int, k: int, samples: int = 200, seed: int = 0) -> dict[str, float]:
    """The control: mean consecutive and nearest-neighbour |cos| of n isotropic random vectors in
    R^k (what vectors that drifted anywhere would show; k = 2: mean |cos| is 2/pi ~ 0.64)."""
    if n < 2 or k < 1:
        raise SoftshareError(f"random_similarity needs n >= 2 vectors of k >= 1 entries, got n={n}, k={k}")
    generator = torch.Generator().manual_seed(seed)
    consecutive, nearest = [], []
    for _ in range(samples):
        summary = bank_dynamics(torch.randn(n, k, generator=generator, dtype=torch.float64), None)
        consecutive.append(summary["consecutive_mean"])
        nearest.append(summary["nearest_mean"])
    return {"consecutive_mean": statistics.fmean(consecutive), "nearest_mean": statistics.fmean(nearest),
            "n": n, "k": k, "samples": samples}


def plot_dynamics(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                  figure_format: str = "png") -> Path:
    """Per bank over epochs: consecutive |cos| (mean, min), nearest-neighbour |cos|, |cos| to the
    start, with the random-direction control as a dotted line; ``run_dir/lsm/dynamics.<format>``."""
    history = coefficient_dynamics(run_dir)
    banks = list(history[-1]["banks"])
    records = read_lsm_history(run_dir)[-1]["banks"]
    shapes = {b["bank"]: (len(b["coefficients"]), len(b["coefficients"][0])) for b in records}
    layers = {b["bank"]: b["layers"] for b in records}
    cols = min(len(banks), 4)
    rows = math.ceil(len(banks) / cols)
    fig = Figure(figsize=(3.4 * cols + 1.5, 2.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    epochs = [h["epoch"] for h in history]
    lines = (("consecutive_mean", "consecutive layers, mean", "C0", "-"),
             ("consecutive_min", "consecutive layers, least", "C0", "--"),
             ("nearest_mean", "nearest other layer, mean", "C1", "-"),
             ("cos_to_start_mean", "own vector at the start", "C2", "-"))
    for ax, bank in zip(axes, banks):
        for key, label, colour, style in lines:
            ax.plot(epochs, [h["banks"][bank].get(key, float("nan")) for h in history], style, color=colour,
                    label=label)
        control = random_similarity(*shapes[bank])["consecutive_mean"]
        ax.axhline(control, color="grey", ls=":", label="random directions (control)")
        ax.axhline(0.99, color="black", lw=0.6, alpha=0.4)
        ax.set(title=bank_label(bank, layers[bank]), xlabel="epoch", ylabel="|cos|", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    for ax in axes[len(banks):]:
        ax.set_axis_off()
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("coefficient vectors over training (line at 0.99: the fold threshold)", fontsize=10)
    path = Path(out) if out else figure_path(Path(run_dir) / "lsm" / DYNAMICS_FIGURE, figure_format)
    return save_figure(fig, path)


__all__ = ["bank_dynamics", "coefficient_dynamics", "random_similarity", "plot_dynamics", "FOLD_LEVELS"]
