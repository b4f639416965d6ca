"""Progress of long loops: a tqdm bar on a terminal, otherwise a log line every ~30 s or 10%.

A batch job's log (nohup, a cluster queue, CI) then still says how far it got, how fast and
when it will end, without the carriage-return noise of a bar. The lines go to a `logging`
logger (the job's own, e.g. ``softshare.train``), so they land wherever that job's log goes
and nowhere when softshare is used as a quiet library.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
_default_log = logging.getLogger("softshare.progress")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """`update()` once per step; `set(**values)` for the numbers shown beside the count.

    Args:
        total: steps expected (None: unknown, no percentage or ETA).
        desc: what is progressing, e.g. ``"epoch 3/10"``.
        log: where the lines go when there is no terminal.
        bar: force the bar on (True) or off (False); None: a bar iff stderr is a terminal.
        every_s, every_fraction: a line after this long or this share of the work, whichever first
            (`every_fraction` None: after `every_s` only, e.g. at most one line per 30 s of a run).
        weights: the relative cost of each step (e.g. the size of each test set), when steps differ:
            the percentage and the ETA are of the work, not of the step count, so a job whose
            last steps are the largest does not promise to end early.
    """

    def __init__(self, total: int | None, desc: str, *, unit: str = "it", initial: int = 0,
                 log: logging.Logger | None = None, bar: bool | None = None, enabled: bool = True,
                 every_s: float = 30.0, every_fraction: float | None = 0.1,
                 weights: Sequence[float] | None = None) -> None:
        if weights is not None:
            total = len(weights)
        self._work = list(itertools.accumulate(weights, initial=0.0)) if weights is not None else None
        self.total, self.desc, self.unit, self.count = total, desc, unit, initial
        self.log = log or _default_log
        self.enabled = enabled
        self.every_s, self.every_fraction = every_s, every_fraction
        self.values: dict[str, object] = {}
        use_bar = sys.stderr.isatty() if bar is None else bar
        self._bar = None
        if enabled and use_bar:  # weighted: the bar counts percent of the work, so its ETA is the work's
            self._bar = (tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False) if self._work is None
                         else tqdm(total=100.0, initial=100 * self._fraction(), desc=desc, leave=False,
                                   bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}"))
        self._start = self._last = time.perf_counter()
        self._initial = initial
        self._next_fraction = self._fraction() + every_fraction if total and every_fraction else None

    def _done(self, count: int) -> float:
        """Work done after `count` steps (steps themselves unless weighted)."""
        if self._work is None:
            return float(count)
        return self._work[min(max(count, 0), len(self._work) - 1)]

    def _fraction(self) -> float:
        return self._done(self.count) / self._done(self.total) if self.total and self._done(self.total) else 0.0

    def describe(self, desc: str) -> None:
        """A new description (e.g. the epoch) for the lines and the bar that follow."""
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc, refresh=False)

    def set(self, **values: object) -> None:
        self.values = values
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def update(self, n: int = 1) -> None:
        self.count += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n if self._work is None else 100 * self._fraction() - self._bar.n)
            return
        now = time.perf_counter()
        due_time = now - self._last >= self.every_s
        due_fraction = self._next_fraction is not None and self._fraction() >= self._next_fraction - 1e-12
        if due_time or due_fraction:
            self.log.info("%s", self.line(now))
            self._last = now
            if self._next_fraction is not None:
                while self._next_fraction <= self._fraction() + 1e-12:
                    self._next_fraction += self.every_fraction

    def line(self, now: float | None = None) -> str:
        """``desc: 45/100 batch (45%), 12.3 batch/s, ETA 0:04, loss=0.31``."""
        elapsed = (now or time.perf_counter()) - self._start
        rate = (self.count - self._initial) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.count}/{self.total} {self.unit}" if self.total else
                 f"{self.desc}: {self.count} {self.unit}"]
        if self.total:
            parts[0] += f" ({self._fraction():.0%}{' of the work' if self._work is not None else ''})"
        parts.append(f"{rate:.3g} {self.unit}/s")
        work_done = self._done(self.count) - self._done(self._initial)  # by this process (after a resume)
        if self.total and work_done > 0 and elapsed > 0:
            parts.append(f"ETA {_duration((self._done(self.total) - self._done(self.count)) * elapsed / work_done)}")
        parts += [f"{k}={v}" for k, v in self.values.items()]
        return ", ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable[T], desc: str, *, total: int | None = None, **kwargs) -> Iterator[T]:
    """Iterate with a `Progress` (total from ``len(iterable)`` when it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc, **kwargs) as meter:
        for item in iterable:
            yield item
            meter.update()
