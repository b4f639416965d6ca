"""The progress helper: log lines with count, percentage, rate and ETA when there is no terminal."""

from __future__ import annotations

import logging

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
