"""The progress helper: log lines with count, percentage, rate and ETA when there is no terminal."""

from __future__ import annotations

import logging
import types

from softshare.progress import Progress, progress


def test_a_line_every_tenth_without_a_terminal(caplog):
    log = logging.getLogger("test.progress")
    with caplog.at_level("INFO", logger="test.progress"):
        items = list(progress(range(20), "epoch 1/3", unit="batch", log=log, bar=False, every_s=1e9))
    assert items == list(range(20))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10  # every 2 of 20 steps
    assert lines[0].startswith("epoch 1/3: 2/20 batch (10%), ") and "batch/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("epoch 1/3: 20/20 batch (100%)")


def test_resumed_count_unknown_total_values_and_disabled(caplog):
    log = logging.getLogger("test.progress")
    with caplog.at_level("INFO", logger="test.progress"):
        with Progress(10, "epoch 2", initial=5, log=log, bar=False, every_s=1e9) as meter:
            meter.set(loss="0.123")
            meter.update()
        with Progress(None, "scan", log=log, bar=False, every_s=0.0) as meter:
            meter.update(3)
        with Progress(10, "quiet", log=log, bar=False, enabled=False, every_s=0.0) as meter:
            meter.update(10)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("epoch 2: 6/10 it (60%)") and lines[0].endswith("loss=0.123")
    assert lines[1].startswith("scan: 3 it, ") and "ETA" not in lines[1] and "%" not in lines[1]
    assert len(lines) == 2


def test_eta_of_steps_of_different_cost_is_the_works(monkeypatch):
    """Sizes 32..512 of prefix sums (work 32+48+...+512): after the first, the slowest is yet to come.
    With a clock at 1 s per unit of work, the ETA is the time the rest takes, not steps x rate."""
    import softshare.progress as module

    clock = [0.0]
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    sizes = [32, 48, 64, 128, 256, 512]
    meter = Progress(None, "scoring", unit="size", bar=False, weights=sizes)
    clock[0] = 32.0  # the first size took its 32 units
    meter.update()
    line = meter.line(clock[0])
    assert line.startswith("scoring: 1/6 size (3% of the work)")
    assert f"ETA {module._duration(sum(sizes) - 32)}" in line  # 16:48, where steps x rate said 2:40
    assert meter.line(clock[0]).count("ETA") == 1


def test_eta_after_a_resume_uses_this_processs_rate(monkeypatch):
    import softshare.progress as module

    clock = [100.0]
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    meter = Progress(100, "epoch 2", initial=90, bar=False)
    clock[0] += 5.0  # 5 batches in 5 s after resuming at 90
    meter.update(5)
    assert "ETA 0:05" in meter.line(clock[0]) and "1 it/s" in meter.line(clock[0])
