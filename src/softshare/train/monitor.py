"""Divergence: the running level of the training loss, and the one-line stop message naming the
checkpoint actually kept."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import read_meta
from ..errors import SoftshareError
from .config import TrainConfig


class TrainingDiverged(SoftshareError):
    """The loss or gradients exploded; the message names the checkpoint kept (or "none yet")."""


# A step's loss this many times its running level (or the level where training started) is a
# spike; SPIKE_STEPS spikes in a row are an explosion (a net with clipped gradients recovers from a
# few bad steps: a width-32 prefix-sum net jumped from 0.07 to 11 for one step and went on to 100%),
# and a loss BLOWUP_FACTOR times the level is one at once.
EXPLOSION_FACTOR = 100.0
SPIKE_STEPS = 20
BLOWUP_FACTOR = 1e4
LEVEL_FLOOR = 0.1  # below this a loss counts as this much (converged losses are noisy ratios)


@dataclass
class LossMonitor:
    """Running level of the training loss; says when a step's loss means training exploded."""

    level: float | None = None  # exponential moving average of recent losses (spikes left out)
    start: float | None = None  # the level after the first steps of the run
    steps: int = 0
    spikes: int = 0  # spikes in a row up to the last update

    def _ratio(self, loss: float) -> tuple[float, str] | None:
        """How far `loss` is above the worse-placed reference, and the reference's description."""
        ratios = []
        if self.level is not None:
            ratios.append((loss / max(self.level, LEVEL_FLOOR), f"its running level {self.level:.3g}"))
        if self.start is not None:
            ratios.append((loss / (10 * max(self.start, LEVEL_FLOOR)), f"where training started ({self.start:.3g})"))
        return max(ratios, key=lambda r: r[0]) if ratios else None

    def problem(self, loss: float) -> str | None:
        """Why `loss` means divergence, or None."""
        if not math.isfinite(loss):
            return f"the loss became {loss}"
        ratio = self._ratio(loss)
        if ratio is None or ratio[0] <= EXPLOSION_FACTOR:
            return None
        if ratio[0] > BLOWUP_FACTOR:
            return f"the loss {loss:.3g} is far above {ratio[1]}"
        if self.spikes + 1 >= SPIKE_STEPS:
            return f"the loss {loss:.3g} stayed far above {ratio[1]} for {SPIKE_STEPS} steps"
        return None

    def update(self, loss: float) -> None:
        ratio = self._ratio(loss)
        if ratio is not None and ratio[0] > EXPLOSION_FACTOR:
            self.spikes += 1  # a spike does not move the level it is judged against
        else:
            self.spikes = 0
            self.level = loss if self.level is None else 0.9 * self.level + 0.1 * loss
        self.steps += 1
        if self.steps == 10:
            self.start = self.level

    def state(self) -> dict:
        return {"level": self.level, "start": self.start, "steps": self.steps, "spikes": self.spikes}


def diverged(problem: str, epoch: int, index: int, run_path: Path, config: TrainConfig) -> TrainingDiverged:
    """The one-line stop message: where it happened and the checkpoint actually kept."""
    last = run_path / "checkpoints" / "last"
    clip = f" or with a tighter --grad-clip than {config.grad_clip:g}" if config.grad_clip else " or with --grad-clip 1"
    try:
        meta = read_meta(last)
        kept = f"kept: {last} (epoch {meta['epoch']}, step {meta['step']})"
        advice = (f"continue from it with a lower learning rate (the same command with --resume auto "
                  f"--lr {config.lr / 10:g}){clip}")
    except (SoftshareError, KeyError):
        kept = "kept: none yet (no checkpoint was written before it diverged)"
        advice = f"start again with a lower learning rate (--lr {config.lr / 10:g}){clip}"
    return TrainingDiverged(f"training diverged at epoch {epoch + 1}, step {index + 1}: {problem}; checkpoint "
                            f"{kept}; {advice}")
