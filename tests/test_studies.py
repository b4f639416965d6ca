"""The end-to-end demo at toy size: every artefact of the report, and no half-written output."""

from __future__ import annotations

import json

import pytest

import softshare.eval.algorithmic as evaluation
import softshare.studies.demo as demo
from helpers import TOY, _make_collinear
from softshare import create_model
from softshare.studies.algorithmic import run_experiment
from softshare.studies.demo import DemoConfig, run_demo
from softshare.errors import SoftshareError
from softshare.storage import output_complete, output_kind
from softshare.studies.recurrence import folded_layers, markdown, run_study
from softshare.train.config import resolve_config


@pytest.mark.slow  # three training processes, then the evaluation: the demo end to end
def test_toy_demo_writes_the_report(tmp_path):
    report = run_demo(DemoConfig(out=str(tmp_path / "demo"), **TOY))
    text = report.read_text()
    out = report.parent
    results = json.loads((out / "results.json").read_text())
    ev = results["evaluations"]
    assert set(ev) == {"recurrent", "shared", "shared_kn", "ff"} and set(ev["ff"]["test"]) == {"32", "40"}
    assert ev["recurrent"]["parameters"] < min(ev["shared"]["parameters"], ev["ff"]["parameters"])
    # TOY: num_templates 2 for the first shared net; the second takes the default 2 (banks the same size)
    assert ev["shared_kn"]["parameters"] == ev["shared"]["parameters"]
    kn = json.loads((out / "runs" / "shared_kn" / "config.json").read_text())
    assert (kn["num_templates"], kn["run_on_fixed_mix"], kn["lsm_every"]) == (2, True, 3)
    assert (out / "runs" / "shared_kn" / "lsm" / "history.png").stat().st_size > 1000
    assert "![LSM over training](runs/shared_kn/lsm/history.png)" in text
    assert ev["ff"]["eval_iterations"] == 2  # the feed-forward net cannot run past its depth
    for evaluation in ev.values():
        assert all(0.0 <= row["stable"] <= 1.0 for row in evaluation["test"].values())
    assert "| parameters |" in text and "![LSM](runs/shared/lsm-evaluated/" in text and "stopping rule" in text
    assert "One seed (0)" in text
    for name in ("thinking.png", "training.png"):
        assert (out / name).stat().st_size > 1000
    assert any((out / "runs" / "shared" / "lsm-evaluated").glob("*.png"))
    assert any((out / "runs" / "shared_kn" / "lsm-evaluated").glob("*.png"))
    assert output_kind(out) == "demo" and output_complete(out)  # a rerun may replace it, nothing else


def test_demo_refuses_bad_values_before_writing(tmp_path):
    with pytest.raises(SoftshareError, match="width must be in"):
        run_demo(DemoConfig(out=str(tmp_path / "demo"), **{**TOY, "width": 100_000}))
    assert not any(tmp_path.iterdir())


def test_interrupted_demo_keeps_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.md").write_text("previous")
    # an earlier demo's output (older versions wrote no marker: it is proven by its results.json)
    (out / "results.json").write_text(json.dumps({"config": DemoConfig().__dict__, "evaluations": {}}))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_train_side_by_side", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_demo(DemoConfig(out=str(out), **TOY))
    assert (out / "report.md").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.json"]


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


@pytest.mark.slow  # four runs trained and scored, twice
def test_experiment_writes_results_and_continues(tmp_path, monkeypatch):
    # nets below LEARNED at the training size are scored at their trained iterations only; at this toy
    # size none learns, so lower the bar to exercise the long evaluation of nets that run longer
    monkeypatch.setattr(evaluation, "LEARNED", 0.0)
    overrides = {"epochs": 1, "train_count": 100, "test_count": 4, "test_sizes": [32, 40], "width": 4, "depth": 2}
    variants = ("ff", "shared_k1", "shared_k2", "recurrent")
    results = run_experiment(tmp_path, "cpu", ("prefix-sums",), variants, (0,), overrides, "cpu")
    assert [(r["variant"], r["seed"]) for r in results["runs"]] == [(v, 0) for v in variants]
    ff, shared1, shared2, rec = results["runs"]
    assert results["summary"][0]["reached_target"] == 0 and results["summary"][0]["steps_to_target"] is None
    assert set(ff["test"]) == {"32", "40"} and ff["eval_iterations"] == 2  # ff cannot run longer than trained
    # k = 1: the two iterations fold into one loop, which then runs 20x the trained iterations
    assert shared1["fold"]["loops"] == [2] and shared1["fold"]["runs_longer"] and shared1["eval_iterations"] == 40
    assert shared1["fold"]["acc_before"] == shared1["fold"]["acc_after"]  # folding is exact at |cos| = 1
    assert rec["eval_iterations"] == 40 and 1 <= rec["test"]["40"]["stable_iteration"] <= 40
    for name in ("results.json", "results.md", "training_prefix-sums.png", "extrapolation_prefix-sums.png",
                 "iterations_prefix-sums.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "runs" / "prefix-sums-shared_k2-s0" / "lsm-evaluated").is_dir()
    report = (tmp_path / "results.md").read_text()
    assert "at the stable stopping rule" in report and "| shared_k1 s0 | [2] |" in report
    weights_file = tmp_path / "runs" / "prefix-sums-ff-s0" / "checkpoints" / "last" / "model.safetensors"
    before = weights_file.stat().st_mtime_ns
    again = run_experiment(tmp_path, "cpu", ("prefix-sums",), variants, (0,), overrides, "cpu", jobs=2)
    assert weights_file.stat().st_mtime_ns == before  # finished runs are reused, not retrained
    assert again["summary"] == results["summary"]
    with pytest.raises(SoftshareError, match="jobs must be a positive integer"):
        run_experiment(tmp_path, "cpu", ("prefix-sums",), variants, (0,), overrides, "cpu", jobs=0)


def test_recurrence_study_checks_its_settings_before_training(tmp_path):
    with pytest.raises(SoftshareError, match="unknown task 'cifar10'"):
        run_study(tmp_path, tasks=("cifar10",))
    with pytest.raises(SoftshareError, match="distinct"):
        run_study(tmp_path, tasks=("mazes",), seeds=(1, 1))
    assert not any(tmp_path.iterdir())


def test_experiment_scores_nets_that_did_not_learn_at_their_trained_iterations(tmp_path):
    overrides = {"epochs": 1, "train_count": 100, "test_count": 4, "test_sizes": [32], "width": 4, "depth": 2}
    results = run_experiment(tmp_path, "cpu", ("prefix-sums",), ("recurrent",), (0,), overrides, "cpu")
    run = results["runs"][0]
    assert run["test"]["32"]["at_trained"] < evaluation.LEARNED and run["eval_iterations"] == 2


def test_recurrence_study_scores_folding_and_reuses_its_finished_runs(tmp_path, monkeypatch):
    import softshare.studies.recurrence as recurrence

    tiny_setting = recurrence.Setting("mazes_cpu", {"model": "shared", "num_templates": 1, "width": 4, "depth": 3,
                                                    "train_count": 20, "test_count": 4, "batch_size": 10,
                                                    "epochs": 1, "test_sizes": [9]})
    monkeypatch.setattr(recurrence, "SETTINGS", {"mazes": tiny_setting})
    results = run_study(tmp_path, tasks=("mazes",), lambdas=(0.0,), seeds=(0,), device="cpu")
    (row,) = results["rows"]
    # k = 1: every layer of a role is a multiple of its one template, so all 3 iterations fold into one loop
    assert row["loops"] == [[3]] and row["layers_folded"] == row["shared_layers"] == 3 * 5
    assert row["accuracy"] == row["folded_accuracy"]  # folding is exact at |cos| = 1
    weights = tmp_path / "runs" / "mazes-reg0-s0" / "checkpoints" / "last" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert run_study(tmp_path, tasks=("mazes",), lambdas=(0.0,), seeds=(0,), device="cpu")["rows"] == [row]
    assert weights.stat().st_mtime_ns == before  # reused, not retrained


def test_study_compares_every_body_at_one_width(tmp_path):
    """The recurrent and k = 1 nets have their own width on prefix sums (48); a study trains every
    body at the preset's (32) so that it compares sharing, not width; an override still wins."""
    from softshare.studies.algorithmic import plan_experiment
    variants = ("ff", "shared_k1", "shared_k2", "recurrent")
    work = plan_experiment(tmp_path, "cpu", ("prefix-sums",), variants, (0,), None, "cpu", 1, 10)
    assert [config.width for config, _, _ in work] == [32] * 4
    work = plan_experiment(tmp_path, "cpu", ("prefix-sums",), variants, (0,), {"width": 48}, "cpu", 1, 10)
    assert [config.width for config, _, _ in work] == [48] * 4


def test_the_demo_trains_the_recipe_its_report_measured(tmp_path):
    """The demo's nets keep the recipe of its README report (width 32, every thought starting from
    the input, He-initialised ff recall convs) even where `softshare train`'s body defaults moved on
    (k = 1: width 48, random starts; ff: recall convs that start as the identity)."""
    shared = demo._train_config(DemoConfig(), "shared", tmp_path)
    recurrent = demo._train_config(DemoConfig(), "recurrent", tmp_path)
    ff = demo._train_config(DemoConfig(), "ff", tmp_path)
    kn = demo._train_config(DemoConfig(), "shared_kn", tmp_path)
    assert (shared.num_templates, shared.width, shared.random_state) == (1, 32, 0.0)
    # the second shared net: the k >= 2 recipe of `softshare train`, as its held-out seeds measured it
    default = resolve_config("prefix_sums_cpu", overrides={"model": "shared", "num_templates": 2})
    assert (kn.model, kn.num_templates, kn.width, kn.lsm_every) == ("shared", 2, 32, 3)
    assert {k: v for k, v in kn.to_dict().items() if k not in ("lsm_every", "out_dir", "name", "test_sizes",
                                                                "test_count", "device", "seed")} == \
        {k: v for k, v in default.to_dict().items() if k not in ("lsm_every", "out_dir", "name", "test_sizes",
                                                                 "test_count", "device", "seed")}
    assert (recurrent.width, recurrent.random_state) == (32, 0.0)
    assert (ff.width, ff.alpha, ff.recall_init, ff.schedule) == (32, 0.0, "he", "cosine")


def test_study_variants_train_as_their_names_say_whatever_the_body_defaults():
    """The k >= 2 body default trains the last iteration past depth (run_on); the study's shared
    variants measure sharing (and the regulariser) without it, and no random starts."""
    from softshare.studies.algorithmic import VARIANTS
    from softshare.train.config import resolve_config
    for name, reg in (("shared_k2", 0.0), ("shared_k2_reg", 1.0), ("shared_k4_reg", 1.0)):
        config = resolve_config("prefix_sums_cpu", overrides=VARIANTS[name].overrides())
        assert (config.run_on, config.random_state, config.recurrence_reg) == (0, 0.0, reg)
    default = resolve_config("prefix_sums_cpu", overrides={"model": "shared", "num_templates": 2})
    assert (default.run_on, default.run_on_fixed_mix) == (30, True)
