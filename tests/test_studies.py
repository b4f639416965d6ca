"""The end-to-end demo at toy size: every artefact of the report, and no half-written output."""

from __future__ import annotations

import json

import pytest

import softshare.studies.demo as demo
from helpers import TOY, _make_collinear
from softshare import create_model
from softshare.studies.algorithmic import run_experiment
from softshare.studies.demo import DemoConfig, run_demo
from softshare.errors import SoftshareError
from softshare.studies.recurrence import folded_layers, markdown, run_study


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
    (out / "results.json").write_text("{}")  # an earlier demo's output (older versions wrote no marker)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_train_side_by_side", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_demo(DemoConfig(out=str(out), **TOY))
    assert (out / "report.md").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.json"]


def test_folded_column_is_the_trained_schedule(tmp_path):
    """At threshold 1.0 nothing folds: the folded net is the shared net with plain convs, so their
    exact-match columns agree (extra iterations are reported apart, never mixed into them)."""
    report = run_demo(DemoConfig(out=str(tmp_path / "demo"), **{**TOY, "threshold": 1.0}))
    results = json.loads((report.parent / "results.json").read_text())
    assert all(n == 1 for loops in results["loops"] for n in loops)
    assert all(row["folded"] == row["shared"] for row in results["exact_match"].values())


def test_folded_layers_counts_layers_in_loops():
    model = create_model("swrn_28_1_4")  # 3 shared blocks (6 shared convs) per stage, k=4 > n: orthogonal rows
    assert folded_layers(model) == (0, 18)
    _make_collinear(model, 0, [1, 2, 3])
    _make_collinear(model, 2, [1, 2])
    assert folded_layers(model) == (6 + 4, 18)


def test_markdown_table_has_a_row_per_run():
    row = {"task": "mazes", "model": "shared", "seed": 0, "epochs": 1, "recurrence_reg": 1.0, "accuracy": 0.5,
           "foldable_pair_similarity": 0.9, "layers_folded": 4, "shared_layers": 32, "loops": [[2, 1]],
           "params": 10, "params_folded": 8, "folded_accuracy": 0.4}
    text = markdown({"threshold": 0.99, "hardware": "cpu", "torch": "x", "rows": [row, row]})
    assert text.count("| mazes |") == 2 and "4/32" in text


def test_experiment_writes_results_and_continues(tmp_path):
    overrides = {"epochs": 1, "train_count": 100, "test_count": 4, "test_sizes": [32, 40], "width": 4, "depth": 2}
    variants = ("ff", "shared_k1", "recurrent")
    results = run_experiment(tmp_path, "cpu", ("prefix-sums",), variants, (0,), overrides, "cpu")
    assert [(r["variant"], r["seed"]) for r in results["runs"]] == [(v, 0) for v in variants]
    ff, shared, rec = results["summary"]
    assert ff["reached_target"] == 0 and ff["steps_to_target"] is None
    assert set(ff["test_at_trained"]) == {"32", "40"} and "test_at_scaled" not in ff
    assert results["runs"][1]["folded_loops"] == [2]  # k = 1: the two blocks fold into one loop
    assert set(shared["test_at_scaled"]) == {"32", "40"} and rec["eval_iterations"] == 512
    for name in ("results.json", "results.md", "training_prefix-sums.png", "extrapolation_prefix-sums.png"):
        assert (tmp_path / name).stat().st_size > 0
    report = (tmp_path / "results.md").read_text()
    assert "| recurrent | scaled |" in report and "| shared_k1 | scaled |" in report
    weights_file = tmp_path / "runs" / "prefix-sums-ff-s0" / "checkpoints" / "last" / "model.safetensors"
    before = weights_file.stat().st_mtime_ns
    again = run_experiment(tmp_path, "cpu", ("prefix-sums",), variants, (0,), overrides, "cpu")
    assert weights_file.stat().st_mtime_ns == before  # finished runs are reused, not retrained
    assert again["summary"] == results["summary"]


def test_recurrence_study_checks_its_settings_before_training(tmp_path):
    with pytest.raises(SoftshareError, match="unknown task 'cifar10'"):
        run_study(tmp_path, tasks=("cifar10",))
    with pytest.raises(SoftshareError, match="distinct"):
        run_study(tmp_path, tasks=("mazes",), seeds=(1, 1))
    assert not any(tmp_path.iterdir())
