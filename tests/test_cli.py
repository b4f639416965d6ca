"""The `softshare` command: job discovery, help, models, params, and its error contract."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import broken_package, foreign, tiny
from softshare import load, load_into
from softshare.analysis import sharing_stats
from softshare.analysis.lsm import record_lsm
import softshare.cli
from softshare.cli import JOBS, build_parser, main
from softshare.data.tasks import files as task_files
from softshare.data.tasks import generate_mazes, load_mazes, load_prefix_sums, maze_dir, save_mazes
from softshare.fold import loop_blocks
from softshare.fold.plan import foldable_sites
from softshare.models import create_model
from softshare.train.config import PRESETS, TrainConfig, resolve_config
from softshare.train.config_help import FIELD_CHOICES, FIELD_HELP
from softshare.train.loop import train
from softshare.version import __version__


def jobs() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "job")
    return list(action.choices)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "softshare", *args], capture_output=True, text=True, env=env)


def test_core_jobs_are_registered_in_order():
    names = jobs()
    assert "models" in names and "params" in names
    assert names.index("models") < names.index("params")  # the order of JOBS


def test_every_job_module_is_listed_and_help_imports_no_torch():
    """A new module in cli/ must be added to JOBS (else it is unreachable); `softshare --help`
    builds only the job list, so it loads neither torch nor matplotlib."""
    package = Path(softshare.cli.__file__).parent
    modules = {p.stem for p in package.glob("*.py") if not p.stem.startswith("_")}
    assert {module for module, _ in JOBS.values()} == modules
    probe = ("import sys, contextlib, io\nfrom softshare.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n    main(['--help'])\n"
             "print(sorted(m for m in ('torch', 'matplotlib', 'softshare.train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_help_lists_every_job_subprocess():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "usage: softshare" in result.stdout
    for job in jobs():
        assert re.search(rf"^\s+{re.escape(job)}\s", result.stdout, re.MULTILINE), job


@pytest.mark.parametrize("job", jobs())
def test_every_job_has_help(job, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([job, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: softshare {job}")


def test_models_prints_names_and_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^(\w+)\s+([\d,]+)$", out, re.MULTILINE))
    assert rows["wrn_28_10"] == "36,479,194"
    assert rows["swrn_28_10_1"] == "12,287,212"
    assert rows["swrn_28_10_2"] == "17,125,630"
    assert rows["swrn_28_14_2"] == "33,537,790"
    families = dict(re.findall(r"^(\S+(?: \(L: [\d, or]+\))?)\s+(\w+\s+[\d,]+)\s{2}", out, re.MULTILINE))
    assert re.split(r"\s+", families["swrn_L_w_k"]) == ["swrn_16_4_1", "1,974,752"]  # readable, an example, its size
    assert re.split(r"\s+", families["resnet_L (L: 26, 50, 101 or 152)"]) == ["resnet_50", "23,528,522"]
    assert "\\d" not in out and "(?!" not in out  # no regexes


def test_models_pattern_and_num_classes(capsys):
    assert main(["models", "wrn_28_*", "--num-classes", "100"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^(\w+)\s+([\d,]+)$", out, re.MULTILINE))
    assert set(rows) == {"wrn_28_10", "wrn_28_14"}
    assert rows["wrn_28_10"] == "36,536,884"


def test_params_of_swrn_28_10_2(capsys):
    assert main(["params", "swrn_28_10_2"]) == 0
    out = capsys.readouterr().out
    bank_rows = re.findall(r"^(stages\.\d\.bank)\s+(\d+)\s+(\d+)\s+(\[[^\]]+\])\s+([\d,]+)\s+([\d,]+)$", out, re.MULTILINE)
    assert bank_rows == [
        ("stages.0.bank", "6", "2", "[160, 160, 3, 3]", f"{2 * 160 * 160 * 9 + 12:,}", f"{6 * 160 * 160 * 9:,}"),
        ("stages.1.bank", "6", "2", "[320, 320, 3, 3]", f"{2 * 320 * 320 * 9 + 12:,}", f"{6 * 320 * 320 * 9:,}"),
        ("stages.2.bank", "6", "2", "[640, 640, 3, 3]", f"{2 * 640 * 640 * 9 + 12:,}", f"{6 * 640 * 640 * 9:,}"),
    ]
    assert re.search(r"total parameters:\s+17,125,630$", out, re.MULTILINE)
    assert re.search(r"unshared equivalent:\s+36,479,194$", out, re.MULTILINE)  # = WRN-28-10
    assert f"{36_479_194 / 17_125_630:.2f}x fewer" in out


def test_params_of_unshared_model(capsys):
    assert main(["params", "wrn_28_10", "--num-classes", "100"]) == 0
    out = capsys.readouterr().out
    assert "no template banks" in out and re.search(r"total parameters:\s+36,536,884$", out, re.MULTILINE)


def test_unknown_model_lists_close_names(capsys):
    assert main(["params", "swrn_28_10_x"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("softshare params: error: unknown model 'swrn_28_10_x'")
    assert "did you mean" in lines[0] and "swrn_28_10_2" in lines[0]
    assert captured.out == ""


@pytest.mark.parametrize("argv,fragment", [
    (["params", "swrn_28_10_2", "--num-classes", "0"], "argument --num-classes: expected a positive integer, got '0'"),
    (["params", "swrn_28_10_2", "--in-channels", "three"], "argument --in-channels: expected a positive integer"),
    (["models", "--num-classes", "-3"], "argument --num-classes: expected a positive integer, got '-3'"),
    (["params"], "the following arguments are required: model"),
])
def test_bad_argument_values_one_line_exit_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"softshare {argv[0]}: error: ") and fragment in err


@pytest.mark.slow  # end-to-end (trains, or runs the CLI in a subprocess): make test-slow
def test_bad_argument_value_subprocess_no_traceback():
    result = run_cli("params", "swrn_28_10_2", "--num-classes", "zero")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "softshare params: error: argument --num-classes: expected a positive integer, got 'zero' "
        "(see 'softshare params --help')"]
    result = run_cli("params", "nosuchmodel_1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "unknown model 'nosuchmodel_1'" in result.stderr


def test_cli_lsm_on_a_run_and_a_checkpoint(model, tmp_path, capsys):
    from softshare.checkpoint import save_checkpoint

    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "last", model)
    record_lsm(model, run, 0)
    assert main(["lsm", str(run)]) == 0
    assert (run / "lsm" / "lsm_stages.2.bank.png").exists() and (run / "lsm" / "history.png").exists()
    assert (run / "lsm" / "dynamics.png").exists()
    out = capsys.readouterr().out
    assert "b1.conv1" in out and "foldable pairs" in out and " of 6 " in out
    assert main(["lsm", str(run / "checkpoints" / "last")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["lsm", str(run / "checkpoints" / "last"), "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "lsm.json").exists()
    # a run directory with --out elsewhere: the history is drawn there too, the run is left as it was
    (run / "lsm" / "history.png").unlink()
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(["lsm", str(run), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "history.png").exists()
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_cli_fold_and_sweep(collinear, tmp_path, capsys):
    from softshare.checkpoint import load, save_checkpoint

    save_checkpoint(tmp_path / "ckpt", copy.deepcopy(collinear).float(), epoch=7)
    out = tmp_path / "folded"
    assert main(["fold", str(tmp_path / "ckpt"), "--threshold", "0.9999", "--out", str(out)]) == 0
    report = json.loads((out / "fold_report.json").read_text())
    assert report["loops"] == [[3], [2, 1], [1, 1, 1]]
    assert loop_blocks(load(out))[0][1].length == 3
    assert main(["fold", str(tmp_path / "ckpt"), "--sweep", "--thresholds", "1", "0.5",
                 "--out", str(tmp_path / "sweep")]) == 0
    assert (tmp_path / "sweep" / "fold_sweep.png").exists()
    assert main(["fold", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_fold_cli_scores_an_algorithmic_run_by_exact_match(tmp_path):
    from softshare.cli import main

    train(tiny(tmp_path, name="shared", model="shared", num_templates=2, epochs=1))
    run = tmp_path / "shared"
    assert main(["fold", str(run), "--out", str(tmp_path / "folded"), "--data", "mazes", "--threshold", "1.0"]) == 0
    report = json.loads((tmp_path / "folded" / "fold_report.json").read_text())
    metrics = report["metrics"]
    assert metrics["original"]["acc"] == metrics["folded"]["acc"]  # nothing folds at 1.0: same function
    assert main(["fold", str(run), "--out", str(tmp_path / "x"), "--data", "cifar10"]) == 2


def test_cli(shared, tmp_path, capsys):
    _, path, _ = shared
    out = tmp_path / "converted"
    assert main(["convert-author", str(path), "--model", "swrn_16_2_2", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"converted {path} (epoch 3) to {out}: swrn_16_2_2, 10 classes")
    for argv in ([str(tmp_path / "missing.pth.tar"), "--model", "swrn_16_2_2"],
                 [str(path), "--model", "swrn_16_1_2"], [str(path), "--model", "nonsense_1"]):
        assert main(["convert-author", *argv, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("softshare convert-author: error: ") and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()


def test_cli_is_deterministic_and_matches_library(tmp_path, capsys):
    for out in ("a", "b"):
        assert main(["data", "mazes", "--size", "13", "--count", "64", "--seed", "2",
                     "--split", "test", "--out", str(tmp_path / out)]) == 0
        assert main(["data", "prefix-sums", "--length", "20", "--count", "300", "--seed", "2",
                     "--out", str(tmp_path / out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and "64 test mazes of size 13" in lines[0]
    files = ["maze_data_test_13/inputs.npy", "maze_data_test_13/solutions.npy",
             "prefix_sums_data/len_20/20_data.npy", "prefix_sums_data/len_20/20_targets.npy"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    x, y = load_mazes(tmp_path / "a", "test", 13)
    inputs, solutions = generate_mazes(64, 13, seed=2, split="test")
    assert np.array_equal(x.numpy(), inputs) and np.array_equal(y.numpy(), solutions)
    other = tmp_path / "c"
    save_mazes(other, "test", 13, inputs, solutions)  # streamed and in-memory writes: same bytes
    assert (other / files[0]).read_bytes() == (tmp_path / "a" / files[0]).read_bytes()


def test_cli_defaults_write_a_small_set_into_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["data", "mazes"]) == 0
    assert main(["data", "prefix-sums"]) == 0
    x, y = load_mazes("data", "train", 9)
    assert x.shape == (1000, 3, 24, 24)
    assert load_prefix_sums("data", 32)[0].shape == (10000, 1, 32)


@pytest.mark.parametrize("argv", [
    ["mazes", "--size", "10"], ["mazes", "--size", "7"], ["mazes", "--size", "403"],
    ["mazes", "--count", "0"], ["mazes", "--seed", "-1"],
    ["prefix-sums", "--length", "4", "--count", "17"], ["prefix-sums", "--length", "0"],
    ["prefix-sums", "--count", "-3"],
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, argv):
    out = tmp_path / "out"
    assert main(["data", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("softshare data: error:") and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_cli_failure_midway_leaves_previous_set_intact(tmp_path, monkeypatch, interrupt):
    assert main(["data", "mazes", "--count", "20", "--out", str(tmp_path)]) == 0
    before = (maze_dir(tmp_path, "train", 9) / "inputs.npy").read_bytes()
    real_fill = task_files.fill_mazes

    def failing_fill(inputs, solutions, *args, **kwargs):
        real_fill(inputs[:5], solutions[:5], *args, **kwargs)
        raise interrupt()

    monkeypatch.setattr(task_files, "fill_mazes", failing_fill)
    argv = ["data", "mazes", "--count", "50", "--seed", "1", "--out", str(tmp_path)]
    if interrupt is KeyboardInterrupt:
        assert main(argv) == 130
    else:
        with pytest.raises(RuntimeError):
            main(argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maze_data_train_9"]  # no temp leftovers
    assert (maze_dir(tmp_path, "train", 9) / "inputs.npy").read_bytes() == before


def test_cli_bad_flag_value_is_one_line(tmp_path, capsys):
    assert main(["train", "--preset", "digits_tiny", "--lr", "-1", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "lr must be > 0" in err and not any(tmp_path.iterdir())


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
    assert (run / "eval-best-mazes.png").stat().st_size > 0  # input, target and prediction per size
    with Image.open(run / "eval-best-mazes.gif") as gif:  # the same rows after iterations 1..5
        assert gif.format == "GIF" and gif.n_frames == 5 and gif.size[1] > gif.size[0] / 3
    assert result["mazes_animation"] == str(run / "eval-best-mazes.gif")
    for size in ("9", "11"):
        stable = result["stop"][size]["stable"]
        assert 0 <= stable["exact_match"] <= 1 and 1 <= stable["mean_iteration"] <= 5
    out = tmp_path / "elsewhere" / "e.json"
    assert main(["eval", str(run / "checkpoints" / "last"), "--count", "4", "--out", str(out), "--format", "pdf"]) == 0
    assert "size" in capsys.readouterr().out
    assert list(json.loads(out.read_text())["accuracy"]) == ["9", "11"]  # the run's test sizes
    assert out.with_suffix(".pdf").read_bytes().startswith(b"%PDF")
    assert (out.parent / "e-mazes.pdf").exists() and (out.parent / "e-mazes.gif").exists()


@pytest.mark.slow  # end-to-end (trains, or runs the CLI in a subprocess): make test-slow
def test_eval_folds_a_k1_shared_run_and_lets_it_think_longer(tmp_path, capsys):
    """`softshare eval` scores a soft-shared run as the study does: folded (k = 1: one loop), run past
    its trained iterations, and says so; --no-fold scores the net as trained."""
    train(tiny(tmp_path, name="k1", model="shared", num_templates=1, epochs=1))
    run = tmp_path / "k1"
    assert main(["eval", str(run), "--sizes", "9", "--iterations", "7", "--count", "4"]) == 0
    out = capsys.readouterr().out
    assert "folded at |cos| >= 0.99 into loops [2] (its last loop runs longer than trained" in out
    result = json.loads((run / "eval-best.json").read_text())
    assert result["fold"]["loops"] == [2] and result["eval_iterations"] == 7 and len(result["accuracy"]["9"]) == 7
    assert main(["eval", str(run), "--iterations", "7", "--no-fold", "--count", "4"]) == 2
    assert "runs at most 2 iterations" in capsys.readouterr().err
    assert main(["eval", str(run), "--sizes", "9", "--no-fold", "--count", "4", "--json"]) == 0
    unfolded = json.loads(capsys.readouterr().out)
    assert unfolded["fold"] is None and unfolded["iterations"] == [1, 2]


def test_eval_folds_at_the_threshold_it_is_given(tmp_path, capsys):
    """--fold-threshold T merges two blocks into a loop exactly when every conv role's coefficient
    vectors have |cos| >= T (computed here from the checkpoint), and says what it folded."""
    train(tiny(tmp_path, name="k2", model="shared", num_templates=2, epochs=1, model_args={"coef_init": "aligned"}))
    run = tmp_path / "k2"
    coefficients = foldable_sites(load(run))[0].coefficients().detach()  # (2 blocks, roles, k)
    least = torch.nn.functional.cosine_similarity(coefficients[0], coefficients[1], dim=-1).abs().min().item()
    assert 0.01 < least < 0.998  # aligned starts: similar, not identical, so both sides can be tried
    for threshold, loops in ((least - 0.001, [2]), (least + 0.001, [1, 1])):
        out = tmp_path / f"e{loops[0]}.json"
        assert main(["eval", str(run), "--sizes", "9", "--count", "4", "--iterations", "2",
                     "--fold-threshold", f"{threshold:.6f}", "--out", str(out)]) == 0
        assert f"folded at |cos| >= {float(f'{threshold:.6f}')} into loops {loops}" in capsys.readouterr().out
        assert json.loads(out.read_text())["fold"]["loops"] == loops
    assert main(["eval", str(run), "--no-fold", "--fold-threshold", "0.9"]) == 2
    assert "--fold-threshold and --no-fold contradict each other" in capsys.readouterr().err


def test_eval_refuses_too_many_iterations_for_ff(tmp_path, capsys):
    train(tiny(tmp_path, name="ff", model="ff", epochs=1))
    assert main(["eval", str(tmp_path / "ff"), "--iterations", "3", "--count", "2"]) == 2
    assert "at most 2" in capsys.readouterr().err
    for flag in ("--iterations", "--patience"):
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", str(tmp_path / "ff"), flag, "0"])
        assert exit_info.value.code == 2


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


def test_task_options_on_an_image_classifier_are_an_error(tmp_path, capsys):
    from softshare import create_model
    from softshare.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ck", create_model("wrn_10_1"), config={"task": "classification", "dataset": "digits"})
    assert main(["eval", str(tmp_path / "ck"), "--sizes", "9"]) == 2
    assert "--sizes apply only to runs on an algorithmic task: drop it" in capsys.readouterr().err


@pytest.mark.slow  # end-to-end (trains, or runs the CLI in a subprocess): make test-slow
def test_experiment_continues_a_study_begun_before_output_markers(monkeypatch, tmp_path, capsys):
    from softshare.cli import experiment as job

    monkeypatch.setattr(job, "run_experiment", lambda *args: None)
    study = tmp_path / "study"
    run = study / "runs" / "prefix-sums-ff-s0"  # a run of a version before markers, proven by its files' content
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(TrainConfig(task="prefix-sums", model="ff").to_dict()))
    (run / "run_info.json").write_text('{"softshare_version": "0.1.0"}')
    assert main(["experiment", "algorithmic", "--out", str(study)]) == 0
    fake = tmp_path / "fake" / "runs" / "r"  # what merely looks like one is not
    (fake / "checkpoints").mkdir(parents=True)
    (fake / "config.json").write_text("{}")
    assert main(["experiment", "algorithmic", "--out", str(tmp_path / "fake")]) == 2
    (tmp_path / "other" / "runs").mkdir(parents=True)  # a runs/ folder holding what is not a run
    (tmp_path / "other" / "runs" / "notes.txt").write_text("keep")
    capsys.readouterr()
    assert main(["experiment", "algorithmic", "--out", str(tmp_path / "other")]) == 2
    assert "did not write" in capsys.readouterr().err


def test_experiment_subcommands_pass_on_exactly_their_own_flags(monkeypatch, tmp_path, capsys):
    from softshare.cli import experiment as job

    calls = []
    monkeypatch.setattr(job, "run_study", lambda *args: calls.append(("recurrence", *args)))
    monkeypatch.setattr(job, "run_experiment", lambda *args: calls.append(("algorithmic", *args)))
    out, other = str(tmp_path / "rec"), str(tmp_path / "alg")  # one study's output is not the other's
    assert main(["experiment", "recurrence", "--tasks", "mazes", "--lambdas", "0", "1", "--seeds", "0", "2",
                 "--epochs", "1", "--device", "cpu", "--out", out]) == 0
    assert main(["experiment", "algorithmic", "--scale", "gpu", "--tasks", "mazes", "--variants", "ff",
                 "--seeds", "4", "--epochs", "2", "--train-count", "30", "--test-count", "5", "--out", other,
                 "--jobs", "2", "--patience", "7", "--format", "svg"]) == 0
    assert calls == [("recurrence", out, ("mazes",), (0.0, 1.0), (0, 2), "cpu", 1, "png"),
                     ("algorithmic", other, "gpu", ("mazes",), ("ff",), (4,),
                      {"epochs": 2, "train_count": 30, "test_count": 5}, "auto", 2, 7, "svg")]
    capsys.readouterr()
    for argv in (["--scale", "gpu"], ["--variants", "ff"], ["--train-count", "5"], ["--tasks", "prefix-sums"]):
        with pytest.raises(SystemExit):
            main(["experiment", "recurrence", *argv])
        assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["experiment", "algorithmic", "--lambdas", "1"])


@pytest.mark.parametrize("args,message", [
    (["--data-root", "/nonexistent/imagenet"], "does not exist"),
    ([], "needs --data-root"),
])
def test_train_imagefolder_bad_root_is_one_line_exit_2(tmp_path, args, message, capsys):
    assert main(["train", "--dataset", "imagefolder", "--model", "resnet_26", "--out-dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and message in err and "Traceback" not in err, err


# -- version, share, params --model-args, config help, --print-config, YAML preset: --
def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"softshare {__version__}"


def test_share_prints_the_plan_and_saves_a_loadable_checkpoint(tmp_path, capsys):
    assert main(["share", "helpers:foreign", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "1 of 5 groups" in out and "4,298 -> 3,728" in out  # as test_convert_share counts by hand
    assert main(["share", "helpers:foreign", "-k", "2", "--init-from-weights", "--out", str(tmp_path / "ck")]) == 0
    assert "load_into" in capsys.readouterr().out
    model = foreign()
    load_into(model, tmp_path / "ck")
    assert sum(p.numel() for p in model.parameters()) == 3728
    # --out: its own earlier output is replaced; anything else only with --overwrite
    assert main(["share", "helpers:foreign", "-k", "2", "--out", str(tmp_path / "ck")]) == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    capsys.readouterr()
    assert main(["share", "helpers:foreign", "-k", "2", "--out", str(tmp_path / "mine")]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_share_of_a_registered_model_and_bad_builders(capsys):
    assert main(["share", "wrn_16_1", "-k", "1"]) == 0
    assert "Conv2d[64, 64, 3, 3] x3" in capsys.readouterr().out
    assert main(["share", "nowhere.at.all:build"]) == 2
    err = capsys.readouterr().err
    assert "no module named 'nowhere'" in err and "cannot build nowhere.at.all:build" in err
    assert main(["share", "helpers:nothing_here"]) == 2
    assert "helpers has no callable 'nothing_here'" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "softshare", "share", "helpers:foreign", "-k", "x"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1


@pytest.mark.slow  # end-to-end (trains, or runs the CLI in a subprocess): make test-slow
def test_a_broken_optional_package_is_one_line_exit_2(tmp_path):
    """`softshare share` of a builder in a broken package, and a preset needing a broken scikit-learn."""
    env = broken_package(tmp_path / "site", "torchvision")
    out = subprocess.run([sys.executable, "-m", "softshare", "share", "torchvision.models:resnet18"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "torchvision.models is installed but fails to import (RuntimeError: operator torchvision::nms" in out.stderr
    env = broken_package(tmp_path / "site2", "sklearn")
    out = subprocess.run([sys.executable, "-m", "softshare", "train", "--preset", "digits_tiny", "--out-dir",
                          str(tmp_path / "runs"), "--epochs", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "sklearn.datasets is installed but fails to import (RuntimeError" in out.stderr and "softshare[digits]" in out.stderr


def test_share_group_by(capsys):
    assert main(["share", "wrn_28_2", "-k", "2", "--group-by", "stage"]) == 0
    assert "3 of " in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["share", "wrn_28_2", "--group-by", "block"])
    assert exit_info.value.code == 2 and "invalid choice: 'block'" in capsys.readouterr().err


def test_curves_of_several_runs_in_one_figure(tmp_path, capsys, monkeypatch):
    from softshare.train import run_dir

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(
            {"epoch": e, "train_loss": 1 / e, "val_loss": 0.5 / e, "train_acc": 0.5, "val_acc": 0.6}) + "\n"
            for e in (1, 2)))
    (tmp_path / "a" / "config.json").write_text(json.dumps({"val_size": 0, "label_smoothing": 0.1}))
    drawn = []
    real = run_dir.curves_figure
    monkeypatch.setattr("softshare.cli.curves.curves_figure", lambda *a: drawn.append(a) or real(*a))
    assert main(["curves", str(tmp_path / "a"), str(tmp_path / "b" / "metrics.jsonl"), "--out",
                 str(tmp_path / "fig"), "--format", "svg"]) == 0
    assert (tmp_path / "fig.svg").read_bytes().startswith(b"<?xml")
    runs, title, split, note = drawn[0]
    assert list(runs) == ["a", "metrics"] and split == "test" and "label smoothing 0.1" in note
    assert main(["curves", str(tmp_path / "a"), "--out", str(tmp_path / "fig.svg")]) == 2  # not its file to replace
    assert "--overwrite" in capsys.readouterr().err
    assert main(["curves", str(tmp_path / "a"), "--labels", "x", "y", "--out", str(tmp_path / "g.png")]) == 2
    assert "2 labels for 1 runs" in capsys.readouterr().err


def test_params_takes_model_args(capsys):
    assert main(["params", "maze_shared", "--model-args", '{"width": 16, "depth": 16}']) == 0
    out = capsys.readouterr().out
    with torch.device("meta"):
        expected = sharing_stats(create_model("maze_shared", width=16, depth=16)).total
    assert f"total parameters:        {expected:,}" in out


def test_every_config_flag_has_help_and_choices():
    assert set(FIELD_HELP) == {f.name for f in dataclasses.fields(TrainConfig)}
    train = next(a for a in build_parser()._actions if a.dest == "job").choices["train"]
    flags = {a.dest: a for a in train._actions}
    for name, text in FIELD_HELP.items():
        assert flags[name].help.startswith(text.replace("%", "%%")) and "(default: " in flags[name].help
    for name, choices in FIELD_CHOICES.items():  # task custom is softshare.fit's: not a flag value
        assert tuple(flags[name].choices) == tuple(c for c in choices if c != "custom")
    for argv in (["--optimizer", "lion"], ["--task", "custom"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", *argv, "--print-config"])
        assert exit_info.value.code == 2


def test_print_config_shows_the_task_fields(capsys):
    assert main(["train", "--preset", "digits_tiny", "--print-config"]) == 0
    image = json.loads(capsys.readouterr().out)
    assert "dataset" in image and "cutout" in image and "train_size" not in image and "alpha" not in image
    assert main(["train", "--task", "mazes", "--print-config"]) == 0
    mazes = json.loads(capsys.readouterr().out)
    assert "train_size" in mazes and "dataset" not in mazes and "cutout" not in mazes


def test_yaml_config_may_name_a_preset(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("preset: digits_tiny\nepochs: 3\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["dataset"] == "digits" and config["epochs"] == 3  # preset < file
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--preset", "fashion_mnist_cpu",
                 "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["dataset"] == "fashion_mnist"  # --preset wins over the file's
    (tmp_path / "bad.yaml").write_text("preset: nope\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml"), "--print-config"]) == 2
    assert "nope" in capsys.readouterr().err


def test_digits_tiny_model_shares():
    with torch.device("meta"):
        stats = sharing_stats(create_model(PRESETS["digits_tiny"]["model"], in_channels=1))
    assert stats.total < 0.7 * stats.unshared_total


def test_train_help_shows_each_tasks_own_defaults():
    """What a run of each task gets without a preset or flag, checked against --print-config."""
    train = next(a for a in build_parser()._actions if a.dest == "job").choices["train"]
    flags = {a.dest: a.help for a in train._actions}
    prefix = resolve_config(overrides={"task": "prefix-sums"})
    mazes = resolve_config(overrides={"task": "mazes"})
    feed_forward = resolve_config(overrides={"task": "prefix-sums", "model": "ff"})  # the task's own width
    assert f"(default: mazes: {mazes.width}; prefix-sums: {feed_forward.width}; prefix-sums recurrent: " \
           f"{prefix.width};" in flags["width"]  # the default body (recurrent) has its own width
    assert mazes.depth == prefix.depth and f"(default: {prefix.depth})" in flags["depth"]  # one value: both tasks
    assert f"(default: 0.0; mazes: {mazes.grad_clip}; prefix-sums: {prefix.grad_clip})" in flags["grad_clip"]
    for name in ("blocks", "head_convs", "alpha"):  # algorithmic fields: their tasks' values only
        ours, theirs = getattr(mazes, name), getattr(prefix, name)
        assert (f"(default: {ours})" if ours == theirs else f"mazes: {ours}; prefix-sums: {theirs}") in flags[name]
    assert "prefix-sums ff: 0.0" in flags["alpha"]  # a body's own default (BODY_DEFAULTS) is shown too
    assert f"(default: 0.1; mazes: {mazes.lr}; prefix-sums: {prefix.lr})" in flags["lr"].replace("%%", "%")
    assert f"(default: {TrainConfig.momentum})" in flags["momentum"]  # the same for every task: one value


def test_eval_names_the_checkpoint_how_it_was_chosen_and_the_split(tmp_path, capsys):
    config = resolve_config("digits_tiny", overrides={"model": "swrn_16_1_2", "epochs": 1, "out_dir": str(tmp_path),
                                                      "name": "r", "device": "cpu"})
    train(config)
    assert main(["eval", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "checkpoints/best (epoch 1 of 1, chosen on validation accuracy" in out
    assert "scored on the digits test set (360 images)" in out
    assert main(["eval", str(tmp_path / "r" / "checkpoints" / "last"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["epoch"] == 1 and "the last epoch trained" in result["chosen"]
    assert main(["eval", str(tmp_path / "r"), "--out", str(tmp_path / "e.json"), "--no-fold"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-fold, --out apply only to runs on an algorithmic task: drop them" in err[0], err
    assert not (tmp_path / "e.json").exists()
