"""Training, resuming and evaluating on the algorithmic tasks through the generic loop and CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from softshare import SoftshareError
from softshare.cli import main
from softshare.train.config import resolve_config
from softshare.train.loop import StopFlag, train

TINY = dict(task="mazes", model="recurrent", width=4, depth=2, train_count=40, test_count=8, batch_size=10,
            epochs=2, seed=3, test_sizes=[9, 11], deterministic=True, device="cpu")


def tiny(tmp_path, **fields):
    return resolve_config(overrides={**TINY, "out_dir": str(tmp_path), **fields})


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run) -> dict:
    return load_file(run / "checkpoints" / "last" / "model.safetensors")


def test_task_defaults_are_adam_and_explicit_fields_win():
    config = resolve_config(overrides={"task": "prefix-sums", "lr": 0.01})
    assert (config.optimizer, config.lr, config.train_size) == ("adam", 0.01, 32)
    assert resolve_config().optimizer == "sgd"  # classification keeps the paper's CIFAR recipe
    assert resolve_config("mazes_cpu").task == "mazes"


def test_tiny_maze_run_learns(tmp_path):
    """Size-9 mazes: loss falls and training exact match leaves the trivial 0% within seconds.

    A CPU test can afford a few hundred steps: enough to fit 48 mazes, far from learning to solve
    mazes in general (that takes thousands of steps; see docs/algorithmic.md).
    """
    config = tiny(tmp_path, model="ff", width=16, depth=8, train_count=48, test_count=16, batch_size=8,
                  epochs=70, lr=3e-3, eval_every=1000, checkpoint_every=1000, name="learn")
    train(config)
    rows = metrics(tmp_path / "learn")
    assert rows[-1]["train_loss"] < 0.3 * rows[0]["train_loss"]
    # predicting "no path" everywhere solves no maze (every maze has a path)
    assert rows[0]["train_acc"] == 0 and max(r["train_acc"] for r in rows[-5:]) >= 0.25, rows[-5:]


class StopAfter(StopFlag):
    """Asks the loop to stop after `steps` training steps, like a SIGTERM would."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        super().__init__()

    @property
    def requested(self) -> bool:
        self.steps -= 1
        return self.steps < 0

    @requested.setter
    def requested(self, value: bool) -> None:
        pass


def test_resume_mid_epoch_is_exact(tmp_path):
    """2 epochs straight == stop after 5 steps (mid epoch 2) + resume, with the progressive loss on."""
    straight = tiny(tmp_path, name="straight", alpha=0.5, depth=3)
    train(straight)
    split = tiny(tmp_path, name="split", alpha=0.5, depth=3)
    assert train(split, stop=StopAfter(5)).interrupted
    train(split, resume="auto")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert [r["train_loss"] for r in metrics(tmp_path / "straight")] == \
        pytest.approx([r["train_loss"] for r in metrics(tmp_path / "split")], abs=1e-6)


def test_eval_writes_table_and_plot(tmp_path, capsys):
    train(tiny(tmp_path, name="ev", epochs=1))
    run = tmp_path / "ev"
    assert main(["eval", str(run), "--sizes", "9", "11", "--iterations", "5", "--count", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "mazes" and result["model"] == "maze_recurrent"
    assert result["iterations"] == [1, 2, 3, 4, 5] and result["trained_iterations"] == 2
    assert list(result["accuracy"]) == ["9", "11"]
    assert all(len(acc) == 5 and all(0 <= a <= 1 for a in acc) for acc in result["accuracy"].values())
    written = json.loads((run / "eval-best.json").read_text())
    assert written["accuracy"] == result["accuracy"]
    assert (run / "eval-best.png").stat().st_size > 0
    out = tmp_path / "elsewhere" / "e.json"
    assert main(["eval", str(run / "checkpoints" / "last"), "--count", "4", "--out", str(out)]) == 0
    assert "size" in capsys.readouterr().out
    assert list(json.loads(out.read_text())["accuracy"]) == ["9", "11"]  # the run's test sizes
    assert out.with_suffix(".png").exists()


def test_eval_refuses_too_many_iterations_for_ff(tmp_path, capsys):
    train(tiny(tmp_path, name="ff", model="ff", epochs=1))
    assert main(["eval", str(tmp_path / "ff"), "--iterations", "3", "--count", "2"]) == 2
    assert "at most 2" in capsys.readouterr().err


@pytest.mark.parametrize("task, model, message", [
    ("prefix-sums", "maze_ff", "cannot be trained on prefix-sums"),
    ("mazes", "wrn_16_4", "cannot be trained on mazes"),
    ("classification", "maze_shared", "train it with --task mazes"),
])
def test_model_task_mismatch_is_one_clear_error(tmp_path, capsys, task, model, message):
    code = main(["train", "--task", task, "--model", model, "--out-dir", str(tmp_path), "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bad_size_and_count(tmp_path):
    with pytest.raises(SoftshareError, match="odd integer"):
        train(tiny(tmp_path, name="even", train_size=10))
    with pytest.raises(SoftshareError, match="smaller than one step"):
        train(tiny(tmp_path, name="few", train_count=5))


def test_experiment_writes_results_and_continues(tmp_path):
    from softshare.experiment import run_experiment

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


def test_task_options_on_an_image_classifier_are_an_error(tmp_path, capsys):
    from softshare import create_model
    from softshare.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ck", create_model("wrn_10_1"), config={"task": "classification", "dataset": "digits"})
    assert main(["eval", str(tmp_path / "ck"), "--sizes", "9"]) == 2
    assert "apply only to runs on an algorithmic task" in capsys.readouterr().err
