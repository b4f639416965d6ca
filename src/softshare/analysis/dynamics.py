"""How a shared net's coefficients move in training: is recurrence appearing, or is it drift?

Read from the LSM history (`record_lsm` keeps each epoch's coefficient vectors), per bank and
epoch: how similar the layers that a fold needs collinear are (the same role in consecutive
blocks, `foldable_pairs`), each layer's nearest other layer, how far each vector has turned from
where it started, and the vectors' norms. Two controls, so a number is read against what chance
gives: `random_similarity` (vectors pointing anywhere) and the drift control of `bank_dynamics`
(each layer turned from its start by the angle it really turned, in a random direction).
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
from .similarity import abs_cosine, foldable_pairs

DYNAMICS_FIGURE = "dynamics"  # + the figure format's suffix
FOLD_LEVELS = (0.9, 0.95, 0.99)


def bank_dynamics(vectors: torch.Tensor, start: torch.Tensor | None,
                  pairs: list[tuple[int, int]] | None = None, drift_samples: int = 200) -> dict[str, float]:
    """Summary of one bank's (n, k) coefficient vectors, against their (n, k) `start` if given.

    ``consecutive_*`` are over `pairs` (default: layers i and i + 1, which for a bank with one
    role per block are the foldable pairs); NaN where there is no pair. With a start, ``drift_*``
    is the control: the same statistics after turning each starting vector by the angle the layer
    really turned, in a random direction (`drift_samples` draws): what the measured movement
    would give if it pointed nowhere in particular.
    """
    vectors = vectors.double()
    n = vectors.shape[0]
    pairs = [(i, i + 1) for i in range(n - 1)] if pairs is None else pairs
    similarity = abs_cosine(vectors)
    others = similarity.masked_fill(torch.eye(n, dtype=torch.bool), -1.0)
    nearest = others.amax(dim=1) if n > 1 else torch.ones(1, dtype=torch.float64)
    norms = vectors.norm(dim=1)
    summary = {
        "pairs": len(pairs),
        **_pair_summary(similarity, pairs, "consecutive"),
        "nearest_mean": float(nearest.mean()),
        "offdiagonal_mean": float(others[others >= 0].mean()) if n > 1 else 1.0,
        "norm_mean": float(norms.mean()),
        "norm_std": float(norms.std()) if n > 1 else 0.0,
    }
    if start is not None:
        start = start.double()
        cosine = torch.nn.functional.cosine_similarity(vectors, start, dim=1)
        summary["cos_to_start_mean"] = float(cosine.abs().mean())
        if pairs and drift_samples:
            drifted = _turned(start, torch.arccos(cosine.clamp(-1.0, 1.0)), drift_samples)
            summary.update(_pair_summary(abs_cosine(drifted), pairs, "drift"))
    return summary


def _pair_summary(similarity: torch.Tensor, pairs: list[tuple[int, int]], prefix: str) -> dict[str, float]:
    """Mean, least and fraction >= each fold level of |cos| over `pairs` of a (..., n, n) matrix."""
    if not pairs:
        return {f"{prefix}_{key}": math.nan for key in ("mean", "min", *(f"at_{level}" for level in FOLD_LEVELS))}
    first, second = (torch.tensor(index) for index in zip(*pairs))
    values = similarity[..., first, second]
    return {f"{prefix}_mean": float(values.mean()), f"{prefix}_min": float(values.amin(-1).mean()),
            **{f"{prefix}_at_{level}": float((values >= level).double().mean()) for level in FOLD_LEVELS}}


def _turned(start: torch.Tensor, angles: torch.Tensor, samples: int, seed: int = 0) -> torch.Tensor:
    """(samples, n, k): each row of `start` turned by its angle towards a random orthogonal direction
    (k = 1 has none: the vector keeps its line, as a real k = 1 layer does)."""
    generator = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize(start, dim=1)
    direction = torch.randn(samples, *start.shape, generator=generator, dtype=torch.float64)
    direction = direction - (direction * unit).sum(-1, keepdim=True) * unit
    direction = torch.nn.functional.normalize(direction, dim=-1)
    return angles.cos()[:, None] * unit + angles.sin()[:, None] * direction


def coefficient_dynamics(run_dir: str | os.PathLike) -> list[dict]:
    """Per recorded epoch: ``{"epoch", "banks": {bank: bank_dynamics(...)}}`` from the LSM history,
    "consecutive" meaning the foldable pairs (`foldable_pairs` of the recorded layer names).

    The first record with coefficients is the reference for how far vectors turned (record the
    start with ``--lsm-every``: the trainer writes epoch 0 before the first step).
    """
    records = [r for r in read_lsm_history(run_dir) if all("coefficients" in b for b in r["banks"])]
    if not records:
        raise SoftshareError(f"no coefficient history in {Path(run_dir)}: train a shared net with --lsm-every N "
                             f"(runs from before coefficients were recorded hold only the matrices)")
    start = {b["bank"]: torch.tensor(b["coefficients"]) for b in records[0]["banks"]}
    return [{"epoch": r["epoch"],
             "banks": {b["bank"]: bank_dynamics(torch.tensor(b["coefficients"]), start.get(b["bank"]),
                                                foldable_pairs(b["layers"]))
                       for b in r["banks"]}}
            for r in records]


def pairs_over_training(run_dir: str | os.PathLike) -> list[dict]:
    """Per recorded epoch, over all banks: how many foldable pairs reach each fold level, their mean
    |cos|, the banks' mean |cos| of a layer to its start, and the drift control (what `softshare lsm
    RUN` prints): ``{"epoch", "pairs", "at_0.9": count, ..., "mean", "cos_to_start", "drift_mean",
    "drift_at_0.9": expected count, ...}``. Epochs without any foldable pair are left out."""
    rows = []
    for record in coefficient_dynamics(run_dir):
        banks = [b for b in record["banks"].values() if b["pairs"]]
        pairs = sum(b["pairs"] for b in banks)
        if not pairs:
            continue

        def total(key: str) -> float:
            return sum(b[key] * b["pairs"] for b in banks)
        row = {"epoch": record["epoch"], "pairs": pairs, "mean": total("consecutive_mean") / pairs,
               **{f"at_{level}": round(total(f"consecutive_at_{level}")) for level in FOLD_LEVELS},
               "cos_to_start": statistics.fmean(b["cos_to_start_mean"] for b in banks)}
        if all("drift_mean" in b for b in banks):
            row["drift_mean"] = total("drift_mean") / pairs
            row.update({f"drift_at_{level}": total(f"drift_at_{level}") for level in FOLD_LEVELS})
        rows.append(row)
    return rows


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
    """Per bank over epochs: |cos| of foldable pairs (mean, least), nearest-neighbour |cos|, |cos| to
    the start, and the two controls (the same turns in random directions; random vectors, dotted);
    ``run_dir/lsm/dynamics.<format>``."""
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
    lines = (("consecutive_mean", "same role, consecutive blocks: mean", "C0", "-"),
             ("consecutive_min", "same role, consecutive blocks: least", "C0", "--"),
             ("nearest_mean", "nearest other layer, mean", "C1", "-"),
             ("cos_to_start_mean", "own vector at the start", "C2", "-"),
             ("drift_mean", "the same turns in random directions (control)", "grey", "-."))
    for ax, bank in zip(axes, banks):
        for key, label, colour, style in lines:
            ax.plot(epochs, [h["banks"][bank].get(key, float("nan")) for h in history], style, color=colour,
                    label=label)
        if shapes[bank][0] > 1:
            control = random_similarity(*shapes[bank])["consecutive_mean"]
            ax.axhline(control, color="grey", ls=":", label="random vectors (control)")
        ax.axhline(0.99, color="black", lw=0.6, alpha=0.4)
        ax.set(title=bank_label(bank, layers[bank]), xlabel="epoch", ylabel="|cos|", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    for ax in axes[len(banks):]:
        ax.set_axis_off()
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("coefficient vectors over training (line at 0.99: the fold threshold)", fontsize=10)
    path = Path(out) if out else figure_path(Path(run_dir) / "lsm" / DYNAMICS_FIGURE, figure_format)
    return save_figure(fig, path)


__all__ = ["bank_dynamics", "coefficient_dynamics", "pairs_over_training", "random_similarity", "plot_dynamics", "FOLD_LEVELS"]
