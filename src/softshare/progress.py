"""Progress of long loops: a tqdm bar on a terminal, otherwise a log line every ~30 s or 10%.

A batch job's log (nohup, a cluster queue, CI) then still says how far it got, how fast and
when it will end, without the carriage-return noise of a bar. The lines go to a `logging`
logger (the job's own, e.g. ``softshare.train``), so they land wherever that job's log goes
and nowhere when softshare is used as a quiet library.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
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
        every_s, every_fraction: a line after this long or this share of `total`, whichever first
            (`every_fraction` None: after `every_s` only, e.g. at most one line per 30 s of a run).
    """

    def __init__(self, total: int | None, desc: str, *, unit: str = "it", initial: int = 0,
                 log: logging.Logger | None = None, bar: bool | None = None, enabled: bool = True,
                 every_s: float = 30.0, every_fraction: float | None = 0.1) -> None:
        self.total, self.desc, self.unit, self.count = total, desc, unit, initial
        self.log = log or _default_log
        self.enabled = enabled
        self.every_s, self.every_fraction = every_s, every_fraction
        self.values: dict[str, object] = {}
        use_bar = sys.stderr.isatty() if bar is None else bar
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False) if enabled and use_bar else None
        self._start = self._last = time.perf_counter()
        self._initial = initial
        self._next_fraction = self._fraction() + every_fraction if total and every_fraction else None

    def _fraction(self) -> float:
        return self.count / self.total if self.total else 0.0

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
            self._bar.update(n)
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
        done = self.count - self._initial
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.count}/{self.total} {self.unit}" if self.total else
                 f"{self.desc}: {self.count} {self.unit}"]
        if self.total:
            parts[0] += f" ({self._fraction():.0%})"
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f"ETA {_duration((self.total - self.count) / rate)}")
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
