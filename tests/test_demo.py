"""The end-to-end demo at toy size: every artefact of the report, and no half-written output."""

from __future__ import annotations

import json

import pytest

import softshare.demo as demo
from softshare.demo import DemoConfig, run_demo

TOY = dict(train_count=100, test_count=10, test_sizes=[9, 13], width=8, depth=3, num_templates=2, epochs=1, extra_iterations=2,
           threshold=0.5, recurrence_reg=1.0)


def test_toy_demo_writes_the_report(tmp_path):
    report = run_demo(DemoConfig(out=str(tmp_path / "demo"), **TOY))
    text = report.read_text()
    out = report.parent
    results = json.loads((out / "results.json").read_text())
    assert set(results["exact_match"]) == {"9", "13"}
    assert results["params"]["shared"] < results["params"]["ff"]
    for row in results["exact_match"].values():
        assert all(0.0 <= row[k] <= 1.0 for k in ("ff", "shared", "folded"))
    assert "| parameters |" in text and "![LSM](lsm/" in text and "softshare train --preset" in text
    for name in ("accuracy.png", "curves_shared.png", "curves_ff.png"):
        assert (out / name).stat().st_size > 1000
    assert (out / "folded" / "model.safetensors").exists()
    assert json.loads((out / "runs" / "shared" / "config.json").read_text())["data_root"] == str(out / "data")


def test_interrupted_demo_keeps_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.md").write_text("previous")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_train_side_by_side", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_demo(DemoConfig(out=str(out), **TOY))
    assert (out / "report.md").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_folded_column_is_the_trained_schedule(tmp_path):
    """At threshold 1.0 nothing folds: the folded net is the shared net with plain convs, so their
    exact-match columns agree (extra iterations are reported apart, never mixed into them)."""
    report = run_demo(DemoConfig(out=str(tmp_path / "demo"), **{**TOY, "threshold": 1.0}))
    results = json.loads((report.parent / "results.json").read_text())
    assert all(n == 1 for loops in results["loops"] for n in loops)
    assert all(row["folded"] == row["shared"] for row in results["exact_match"].values())


def test_fold_cli_scores_a_maze_run_by_exact_match(tmp_path):
    from softshare.cli import main

    run_demo(DemoConfig(out=str(tmp_path / "demo"), **TOY))
    run = tmp_path / "demo" / "runs" / "shared"
    assert main(["fold", str(run), "--out", str(tmp_path / "folded"), "--data", "mazes", "--threshold", "1.0"]) == 0
    report = json.loads((tmp_path / "folded" / "fold_report.json").read_text())
    metrics = report["metrics"]
    assert metrics["original"]["acc"] == metrics["folded"]["acc"]  # nothing folds at 1.0: same function
    assert main(["fold", str(run), "--out", str(tmp_path / "x"), "--data", "cifar10"]) == 2
