"""Never lose a user's data (issue 10): outputs that refuse to clobber, crash-safe checkpoints
(kill-torture), one writer per run, every bad value refused before anything is written, explicit
resume, divergence detection. Every refusal: exit code 2, one line on stderr, nothing written."""

from __future__ import annotations

import dataclasses
import errno
import gzip
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import time
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, tiny

from softshare.checkpoint import load, load_checkpoint, save_checkpoint
from softshare.cli import main
from softshare.data.dataset import split_indices
from softshare.data.idx import read_idx
from softshare.errors import SoftshareError
from softshare.storage import (OUTPUT_MARKER, atomic_path, check_output, exclusive_lock, mark_output, output_lock,
                               rebuild_dir, recover_leftovers)
from softshare.models import create_model
from softshare.train.config import RANGES, TrainConfig
from softshare.train.config_help import FIELD_CHOICES
from softshare.train.loop import train
from softshare.train.monitor import SPIKE_STEPS, LossMonitor, TrainingDiverged
from softshare.train.run_dir import read_metrics


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes: what 'nothing was written or lost' compares."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(capsys, *argv: str) -> str:
    """Run the CLI in-process; assert exit 2 and exactly one line on stderr; return that line."""
    try:
        code = main(list(argv))
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny run (mazes, shared width 4): runs/run/checkpoints/{last,best}."""
    root = tmp_path_factory.mktemp("runs")
    train(tiny(root, name="run", model="shared"))
    return root / "run"


# -- outputs never destroy what the user had ---------------------------------------------------
def test_d7_demo_refuses_a_users_report_a_foreign_directory_and_a_file(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    mydemo = tmp_path / "mydemo"  # what a demo writes, but the user's (D7): not proven a demo's
    mydemo.mkdir()
    (mydemo / "report.md").write_text("# my report")
    (mydemo / "results.json").write_text('{"mine": 1}')
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    assert "--overwrite" in refused(capsys, "demo", "--out", str(mine))
    assert "--overwrite" in refused(capsys, "demo", "--out", str(mydemo))
    assert "is a file" in refused(capsys, "demo", "--out", str(tmp_path / "file"))
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine", "mydemo"]


def test_eval_out_refuses_a_directory_and_a_foreign_file(run, tmp_path, capsys):
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "dir.json" / "keep").write_text("keep")
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    before = snapshot(tmp_path)
    assert "is a directory, not a file" in refused(capsys, "eval", str(run), "--out", str(tmp_path / "dir.json"))
    assert "--overwrite" in refused(capsys, "eval", str(run), "--out", str(tmp_path / "notes.json"))
    assert snapshot(tmp_path) == before
    out = tmp_path / "new.json"  # a new path, then its own earlier output: both fine
    assert main(["eval", str(run), "--out", str(out), "--count", "4", "--sizes", "9"]) == 0
    assert main(["eval", str(run), "--out", str(out), "--count", "4", "--sizes", "9"]) == 0
    assert json.loads(out.read_text())["softshare_output"] == "eval"


def test_fold_and_convert_never_overwrite_a_checkpoint(run, tmp_path, capsys):
    best = run / "checkpoints" / "best"
    other = tmp_path / "other"
    save_checkpoint(other, create_model("swrn_16_1_2"))
    before, theirs = snapshot(run), snapshot(other)
    assert "its own source" in refused(capsys, "fold", str(run), "--out", str(best))
    assert "--overwrite" in refused(capsys, "fold", str(run), "--out", str(other))
    (tmp_path / "file").write_text("x")
    assert "is a file" in refused(capsys, "fold", str(run), "--out", str(tmp_path / "file"))
    assert "--overwrite" in refused(capsys, "convert-author", str(tmp_path / "file"), "--model", "swrn_16_1_2",
                                    "--out", str(other))
    assert snapshot(run) == before and snapshot(other) == theirs
    folded = tmp_path / "folded"
    for _ in range(2):  # a rerun replaces its own earlier output
        assert main(["fold", str(run), "--out", str(folded)]) == 0
    assert json.loads((folded / OUTPUT_MARKER).read_text())["kind"] == "fold"
    assert main(["fold", str(run), "--out", str(other), "--overwrite"]) == 0
    assert (other / "fold_report.json").exists() and snapshot(run) == before


def test_lsm_and_data_refuse_a_file(run, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "is a file" in refused(capsys, "lsm", str(run), "--out", str(tmp_path / "file"))
    assert "is a file" in refused(capsys, "data", "mazes", "--count", "2", "--out", str(tmp_path / "file"))
    (tmp_path / "maze_data_train_9").mkdir()
    (tmp_path / "maze_data_train_9" / "mine.txt").write_text("x")
    assert "--overwrite" in refused(capsys, "data", "mazes", "--count", "2", "--out", str(tmp_path))
    assert snapshot(tmp_path) == {"file": b"x", "maze_data_train_9/mine.txt": b"x"}


def test_replacing_keeps_the_old_output_until_the_new_one_is_complete(tmp_path):
    out = tmp_path / "out"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("half")
        raise RuntimeError
    assert snapshot(out) == {"a": b"old"} and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_leftovers_of_dead_writers_are_recovered(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".last.old-{dead.pid}").mkdir()  # killed between the two renames: last is missing
    (tmp_path / f".last.old-{dead.pid}" / "meta.json").write_text("{}")
    (tmp_path / f".best.{dead.pid}.abc.tmp").mkdir()
    (tmp_path / f".metrics.jsonl.{os.getpid()}.xyz.tmp").write_text("")  # a live writer's: kept
    done = recover_leftovers(tmp_path)
    assert len(done) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last", f".metrics.jsonl.{os.getpid()}.xyz.tmp"])
    assert (tmp_path / "last" / "meta.json").exists()


def test_check_output_rules(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "new", "demo") == tmp_path / "new"
    assert check_output(tmp_path / "empty", "demo") == tmp_path / "empty"
    mark_output(tmp_path / "empty", "lsm")
    with pytest.raises(SoftshareError, match="softshare lsm output"):
        check_output(tmp_path / "empty", "demo")
    assert check_output(tmp_path / "empty", "demo", overwrite=True)


# -- checkpoints survive a crash at any instant -------------------------------------------------
@pytest.mark.slow  # a dozen killed-and-resumed training processes
def test_kill_torture_resumes_to_the_uninterrupted_weights(tmp_path):
    """Kill a real training process at 10 named points inside the save (the first checkpoint
    write, between the renames of a swap, between best and last...) and at random instants;
    resuming each time must end bit-identical to an uninterrupted run, with no leftovers."""
    driver = Path(__file__).with_name("kill_torture.py")  # ends on its own: every child is trained or killed
    out = subprocess.run([sys.executable, str(driver), str(tmp_path), "0", "5"], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    named = [code for point, code in result["codes"] if point != "random"]
    assert named == [86] * len(named), result["codes"]  # every injected point was reached and killed it
    assert result["final"] == 0 and result["equal"], result
    assert result["epochs"] == [1, 2, 3, 4] and result["leftovers"] == []
    assert result["best_epoch"] >= result["last_records_best_epoch"]


@pytest.mark.slow  # end-to-end (trains, or runs the CLI in a subprocess): make test-slow
def test_a_kill_during_the_first_checkpoint_leaves_a_resumable_run(tmp_path, capsys):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SOFTSHARE_CRASH_AT": "weights@last"}
    code = "from helpers import tiny; from softshare.train.loop import train; train(tiny(%r, name='run'))"
    died = subprocess.run([sys.executable, "-c", code % str(tmp_path)], env=env, cwd=Path(__file__).parent,
                          capture_output=True)
    assert died.returncode == 86
    assert not (tmp_path / "run" / "checkpoints" / "last").exists()
    result = train(tiny(tmp_path, name="run"), resume="auto")
    assert result.epochs_done == 2 and not list((tmp_path / "run" / "checkpoints").glob(".*"))


# -- one writer per run directory ---------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder(run, capsys):
    before = snapshot(run)
    with exclusive_lock(run, "run directory", "wait"):
        line = refused(capsys, "train", "--task", "mazes", "--model", "shared", "--out-dir", str(run.parent),
                       "--name", run.name, "--resume", "auto", "--device", "cpu")
    assert f"PID {os.getpid()}" in line
    assert snapshot(run) == before


def test_a_stale_lock_never_blocks(tmp_path):
    train(tiny(tmp_path, name="run", epochs=1))
    (tmp_path / "run" / ".lock").write_text("999999\n")  # written by a process long gone: no flock held
    assert train(tiny(tmp_path, name="run", epochs=2), resume="auto").epochs_done == 2


# -- every value is validated before anything is written ----------------------------------------
@pytest.mark.parametrize("flag, value, message", [
    ("--grad-clip", "-1", "grad_clip must be >= 0"), ("--lr", "inf", "lr must be > 0 and finite"),
    ("--momentum", "nan", "momentum must be in [0, 1)"), ("--warmup-epochs", "nan", "warmup_epochs"),
    ("--lr-gamma", "-1", "lr_gamma must be in (0, 1]"), ("--cutout", "100000", "cutout must be in [0, 1,024]"),
    ("--momentum", "-3", "momentum must be in [0, 1)"), ("--label-smoothing", "5", "label_smoothing"),
    ("--eval-every", "0", "eval_every"), ("--checkpoint-every", "0", "checkpoint_every"),
    ("--model-args", '{"foo": 1}', "does not take 'foo'"), ("--model", "wrn_99999999999999994_1", "at most 1,000"),
    ("--ema-decay", "1", "ema_decay must be in [0, 1)"), ("--blocks", "0", "blocks must be in [1, 1,000]"),
    ("--workers", "-2", "workers must be in [-1, 256]"), ("--image-size", "4", "image_size must be in [8, 4,096]"),
    ("--lr-reference-batch", "-1", "lr_reference_batch must be in"),
])
def test_bad_values_are_refused_before_anything_is_written(tmp_path, capsys, flag, value, message):
    line = refused(capsys, "train", "--preset", "digits_tiny", "--out-dir", str(tmp_path / "runs"), flag, value)
    assert message in line
    assert not (tmp_path / "runs").exists()


def test_every_numeric_config_field_has_a_range():
    hints = typing.get_type_hints(TrainConfig)
    numeric = {f.name for f in dataclasses.fields(TrainConfig)
               if {int, float} & ({hints[f.name]} | set(typing.get_args(hints[f.name])))}
    assert numeric == set(RANGES)
    assert {"logger", "optimizer", "task"} <= set(FIELD_CHOICES)


def test_argparse_errors_are_one_line_with_a_pointer_to_help(capsys):
    assert "see 'softshare data mazes --help'" in refused(capsys, "data", "mazes", "--count", "1e12")
    assert "--no-such-flag (see 'softshare --help')" in refused(capsys, "train", "--no-such-flag")
    assert "see 'softshare --help'" in refused(capsys, "no-such-job")


def test_absurd_sizes_are_refused_before_any_work(tmp_path, capsys):
    assert "at most 1,000" in refused(capsys, "params", "wrn_99999999999999994_1")
    assert "10,000,000" in refused(capsys, "data", "mazes", "--count", "1000000000000", "--out", str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_sizes_in_checkpoint_metadata_are_checked_before_allocation(tmp_path):
    save_checkpoint(tmp_path / "c", create_model("wrn_10_1"))
    meta_path = tmp_path / "c" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "model": {**meta["model"], "num_classes": 10 ** 12}}))
    with pytest.raises(SoftshareError, match="num_classes must be an integer from 1 to 1,000,000"):
        load(tmp_path / "c")
    meta_path.write_text(json.dumps({**meta, "model": {**meta["model"], "num_classes": 100_000}}))
    with pytest.raises(SoftshareError, match="does not hold"):  # proven on the meta device, nothing allocated
        load(tmp_path / "c")
    for bad in ({"aliases": {"a": 1}}, {"config": [1, 2]}):
        meta_path.write_text(json.dumps({**meta, **bad}))
        with pytest.raises(SoftshareError, match="invalid"):
            load(tmp_path / "c")


def test_a_stride_zero_tensor_in_an_author_checkpoint_is_refused(tmp_path, capsys):
    huge = torch.zeros(1).expand(10 ** 12)  # 4 TB once copied; one float on disk
    torch.save({"state_dict": {"conv_3x3.weight": huge}}, tmp_path / "evil.pth.tar")
    line = refused(capsys, "convert-author", str(tmp_path / "evil.pth.tar"), "--model", "swrn_16_1_2",
                   "--out", str(tmp_path / "out"))
    assert "does not fit its storage" in line and not (tmp_path / "out").exists()


def test_idx_header_with_negative_dimensions(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x02" + struct.pack(">2i", -2, -3) + bytes(6))
    with pytest.raises(SoftshareError, match="negative dimensions"):
        read_idx(path)


def test_val_size_message_for_an_empty_dataset():
    with pytest.raises(SoftshareError, match="no training images"):
        split_indices(0, 0, 0)


def test_fold_on_nan_weights(tmp_path, capsys):
    model = create_model("swrn_16_1_2")
    with torch.no_grad():
        next(model.parameters()).fill_(math.nan)
    save_checkpoint(tmp_path / "nan", model)
    assert "non-finite weights" in refused(capsys, "fold", str(tmp_path / "nan"), "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_wrong_or_malicious_training_state_is_refused_with_a_safe_fix(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    state = copy / "checkpoints" / "last" / "state.pt"
    torch.save({"epoch": "two", "optimizer": []}, state)
    args = ("train", "--task", "mazes", "--model", "shared", "--out-dir", str(tmp_path), "--name", "run",
            "--resume", "auto", "--device", "cpu", "--epochs", "3")
    assert "does not hold the training state softshare writes" in refused(capsys, *args)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    torch.save({"epoch": Evil()}, state)
    before = snapshot(copy)
    line = refused(capsys, *args)
    assert "holds code or objects softshare will not load" in line and "delete state.pt" in line
    assert "weights_only=False" not in line and "weights_only" not in line
    assert snapshot(copy) == before


def test_a_converted_checkpoint_cannot_be_resumed(tmp_path, capsys):
    save_checkpoint(tmp_path / "conv", create_model("swrn_16_1_2"), train_state={"epoch": 0})
    line = refused(capsys, "train", "--preset", "digits_tiny", "--out-dir", str(tmp_path), "--resume",
                   str(tmp_path / "conv"))
    assert "records no training config" in line


# -- resume is explicit ---------------------------------------------------------------------------
def test_resume_applies_safe_changes_and_refuses_the_rest(tmp_path, capsys):
    train(tiny(tmp_path, name="run", epochs=1))
    base = ("train", "--task", "mazes", "--model", "recurrent", "--out-dir", str(tmp_path), "--name", "run",
            "--resume", "auto", "--device", "cpu")
    before = snapshot(tmp_path / "run")
    line = refused(capsys, *base, "--width", "8", "--lr", "0.01")
    assert "cannot change --width" in line and "--lr" not in line.split("when resuming")[0]
    assert snapshot(tmp_path / "run") == before
    assert main([*base, "--epochs", "2", "--lr", "0.0005"]) == 0
    out = capsys.readouterr().out
    assert "resume: lr changed from 0.001 to 0.0005" in out and "resume: epochs changed from 1 to 2" in out
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["resumes"][-1]["changed"] == {"epochs": [1, 2], "lr": [0.001, 0.0005]}
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last").meta["config"]["lr"] == 0.0005


def test_resume_scales_an_lr_given_for_a_reference_batch_as_the_start_did(tmp_path):
    """A run with linear lr scaling records the lr it used; the same lr and reference batch given
    with a resume mean the same lr (no change), another lr is scaled before it applies."""
    config = tiny(tmp_path, name="scaled", epochs=1, lr=0.004, lr_reference_batch=4 * TINY["batch_size"])
    train(config)
    saved = load_checkpoint(tmp_path / "scaled" / "checkpoints" / "last").meta["config"]
    assert (saved["lr"], saved["lr_reference_batch"]) == (0.001, 0)
    before = snapshot(tmp_path / "scaled")
    train(tiny(tmp_path, name="scaled", epochs=1, lr=0.004, lr_reference_batch=4 * TINY["batch_size"]),
          resume="auto", changes={"lr": 0.004, "lr_reference_batch": 4 * TINY["batch_size"]})
    assert snapshot(tmp_path / "scaled") == before  # no change asked: a finished run has nothing to do
    train(tiny(tmp_path, name="scaled", epochs=2, lr=0.008, lr_reference_batch=4 * TINY["batch_size"]),
          resume="auto", changes={"epochs": 2, "lr": 0.008})  # the reference batch from the preset/config
    info = json.loads((tmp_path / "scaled" / "run_info.json").read_text())
    assert info["resumes"][-1]["changed"] == {"epochs": [1, 2], "lr": [0.001, 0.002]}


# -- divergence ----------------------------------------------------------------------------------
def test_loss_monitor_catches_explosions_not_just_nan():
    monitor = LossMonitor()
    for loss in [2.3, 2.1, 1.9, 1.8] * 5:
        assert monitor.problem(loss) is None
        monitor.update(loss)
    assert "far above its running level" in monitor.problem(6.6e25)
    assert "became nan" in monitor.problem(math.nan)
    assert monitor.problem(3.0) is None  # a bad batch is not an explosion


def test_loss_monitor_lets_a_clipped_net_recover_from_a_spike():
    """A converged net's loss jumping 0.07 -> 11 for a few steps (seen on prefix sums with clipping,
    a run that went on to 100%) is not divergence; the same loss held for SPIKE_STEPS steps is."""
    monitor = LossMonitor()
    for loss in [0.7] * 10 + [0.07] * 30:
        monitor.update(loss)
    level = monitor.level
    for _ in range(3):
        assert monitor.problem(11.4) is None
        monitor.update(11.4)
    assert monitor.level == level  # spikes do not raise the level they are judged against
    for loss in [0.3, 0.1, 0.07]:
        assert monitor.problem(loss) is None
        monitor.update(loss)
    assert monitor.spikes == 0
    for step in range(SPIKE_STEPS):
        problem = monitor.problem(11.4)
        if step < SPIKE_STEPS - 1:
            assert problem is None
            monitor.update(11.4)
    assert f"stayed far above its running level {monitor.level:.3g} for {SPIKE_STEPS} steps" in problem


def test_divergence_names_the_checkpoint_kept(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step \d+: .*kept: none yet.* or with --grad-clip 1$"):
        train(tiny(tmp_path, name="a", epochs=1, lr=1e12, grad_clip=0.0))
    with pytest.raises(TrainingDiverged, match=r"or with a tighter --grad-clip than 5$"):  # clipping already on
        train(tiny(tmp_path, name="c", epochs=1, lr=1e12, grad_clip=5.0))
    train(tiny(tmp_path, name="b", epochs=1))
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step \d+: .*kept: .*b/checkpoints/last \(epoch 1"):
        train(tiny(tmp_path, name="b", epochs=2), resume="auto", changes={"epochs": 2, "lr": 1e12})
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last").meta["epoch"] == 1


# -- output ownership by proof, not by look (D1-D8) -------------------------------------------------
TRAIN_TINY = ("train", "--task", "prefix-sums", "--model", "recurrent", "--width", "4", "--depth", "2",
              "--train-count", "40", "--test-count", "8", "--test-sizes", "32", "--batch-size", "10",
              "--select-size", "0", "--device", "cpu")


def test_d1_a_directory_that_looks_like_a_run_is_not_trained_into(tmp_path, capsys):
    project = tmp_path / "proj"
    (project / "checkpoints" / "best").mkdir(parents=True)
    (project / "checkpoints" / "best" / "model.safetensors").write_bytes(b"the user's weights")
    (project / "metrics.jsonl").write_text("mine\n")
    (project / ".lock").write_text("")
    before = snapshot(tmp_path)
    for extra in ((), ("--resume", "auto")):
        line = refused(capsys, *TRAIN_TINY, "--out-dir", str(tmp_path), "--name", "proj", "--epochs", "1", *extra)
        assert "not a softshare run directory" in line and "--resume" not in line
        assert snapshot(tmp_path) == before


def test_d2_a_users_config_json_gets_no_advice_to_resume(tmp_path, capsys):
    mine = tmp_path / "exp"
    mine.mkdir()
    (mine / "config.json").write_text('{"learning_rate": 3, "notes": "mine"}')
    before = snapshot(tmp_path)
    line = refused(capsys, *TRAIN_TINY, "--out-dir", str(tmp_path), "--name", "exp", "--epochs", "1")
    assert "not a softshare run directory" in line and "--resume auto" not in line
    assert "not a softshare run directory" in refused(capsys, *TRAIN_TINY, "--out-dir", str(tmp_path), "--name",
                                                      "exp", "--epochs", "1", "--resume", "auto")
    assert snapshot(tmp_path) == before
    # --overwrite trains into it, replacing only what a run writes (config.json is one of those)
    (mine / "thesis.tex").write_text("years of work")
    assert main([*TRAIN_TINY, "--out-dir", str(tmp_path), "--name", "exp", "--epochs", "1", "--overwrite"]) == 0
    assert (mine / "thesis.tex").read_text() == "years of work" and (mine / "checkpoints" / "last").is_dir()


def test_d3_resume_never_writes_into_another_run(tmp_path, capsys):
    runs = tmp_path / "runs"
    for name in ("A", "B"):
        assert main([*TRAIN_TINY, "--out-dir", str(runs), "--name", name, "--epochs", "2"]) == 0
    theirs = snapshot(runs / "B")
    line = refused(capsys, "train", "--resume", str(runs / "A"), "--out-dir", str(runs), "--name", "B",
                   "--epochs", "4")
    assert "never writes into another run" in line and str(runs / "B") in line
    assert snapshot(runs / "B") == theirs


def test_resume_run_continues_it_wherever_it_lives(tmp_path, monkeypatch):
    elsewhere = tmp_path / "archive" / "old"
    assert main([*TRAIN_TINY, "--out-dir", str(elsewhere.parent), "--name", "old", "--epochs", "1"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(elsewhere), "--epochs", "2"]) == 0
    assert not (tmp_path / "runs").exists()  # not ./runs/<name from the config>
    assert [row["epoch"] for row in read_metrics(elsewhere)] == [1, 2]
    assert load_checkpoint(elsewhere / "checkpoints" / "last").meta["epoch"] == 2


def test_d4_data_over_the_public_layout(tmp_path, capsys):
    public = tmp_path / "maze_data_train_9"
    public.mkdir()
    np.save(public / "inputs.npy", np.zeros((2, 3, 24, 24)))  # the public benchmark's files are float64
    np.save(public / "solutions.npy", np.zeros((2, 24, 24)))
    (public / "README.txt").write_text("public benchmark, CC-BY")
    before = snapshot(tmp_path)
    assert "--overwrite" in refused(capsys, "data", "mazes", "--count", "3", "--out", str(tmp_path))
    assert snapshot(tmp_path) == before
    assert main(["data", "mazes", "--count", "3", "--out", str(tmp_path), "--overwrite"]) == 0
    assert (public / "README.txt").read_text() == "public benchmark, CC-BY"  # kept beside the new set
    assert np.load(public / "inputs.npy").dtype == np.uint8 and len(np.load(public / "inputs.npy")) == 3
    assert main(["data", "mazes", "--count", "4", "--out", str(tmp_path)]) == 0  # now its own set: replaced
    assert (public / "README.txt").exists() and len(np.load(public / "inputs.npy")) == 4
    sums = tmp_path / "prefix_sums_data" / "len_8"
    sums.mkdir(parents=True)
    torch.save(torch.zeros(2, 8), sums / "8_data.pth")
    np.save(sums / "8_data.npy", np.zeros((2, 8)))
    before = snapshot(sums)
    assert "--overwrite" in refused(capsys, "data", "prefix-sums", "--length", "8", "--count", "4", "--out",
                                    str(tmp_path))
    assert snapshot(sums) == before


def test_data_sets_of_earlier_versions_are_proven_by_content(tmp_path):
    from softshare.data.tasks import written_by_softshare

    folder = tmp_path / "maze_data_train_9"
    folder.mkdir()
    np.save(folder / "inputs.npy", np.zeros((1, 3, 24, 24), np.uint8))
    np.save(folder / "solutions.npy", np.zeros((1, 24, 24), np.uint8))
    assert written_by_softshare(folder, ("inputs.npy", "solutions.npy"))
    (folder / "notes.txt").write_text("x")  # anything else there: not provably ours
    assert not written_by_softshare(folder, ("inputs.npy", "solutions.npy"))


def test_d5_experiment_refuses_a_users_results_and_has_overwrite(tmp_path, capsys):
    study = tmp_path / "mystudy"
    study.mkdir()
    (study / "results.json").write_text('{"mine": true}')
    before = snapshot(tmp_path)
    for name in ("recurrence", "algorithmic"):
        line = refused(capsys, "experiment", name, "--out", str(study), "--epochs", "1")
        assert "--overwrite" in line and "did not write" in line
    assert snapshot(tmp_path) == before
    assert "--overwrite" in main_help(capsys, "experiment", "recurrence")


def main_help(capsys, *job: str) -> str:
    with pytest.raises(SystemExit):
        main([*job, "--help"])
    return capsys.readouterr().out


def test_d6_lsm_refuses_a_users_lsm_json(run, tmp_path, capsys):
    analysis = tmp_path / "analysis"
    analysis.mkdir()
    (analysis / "lsm.json").write_text('{"my": "own analysis"}')
    before = snapshot(tmp_path)
    assert "--overwrite" in refused(capsys, "lsm", str(run), "--out", str(analysis))
    assert snapshot(tmp_path) == before
    (analysis / "paper.md").write_text("draft")
    assert main(["lsm", str(run), "--out", str(analysis), "--overwrite"]) == 0
    assert (analysis / "paper.md").read_text() == "draft" and "banks" in json.loads((analysis / "lsm.json").read_text())
    assert main(["lsm", str(run), "--out", str(analysis)]) == 0  # its own output now


def test_rebuild_in_place_keeps_the_users_files_and_rolls_back(tmp_path):
    """What demo --overwrite does: only the job's entries are set aside (inside the directory, which
    never moves) and put back if the build fails or its writer dies half-way."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("old report")
    (out / "thesis.tex").write_text("years of work")
    inode = out.stat().st_ino
    with pytest.raises(RuntimeError), rebuild_dir(out, "demo", ["report.md", "runs"]) as work:
        (work / "report.md").write_text("half")
        (work / "runs").mkdir()
        raise RuntimeError
    assert snapshot(out) == {"report.md": b"old report", "thesis.tex": b"years of work"}
    assert out.stat().st_ino == inode
    code = ("import os, sys; from softshare.storage import rebuild_dir\n"
            "with rebuild_dir(sys.argv[1], 'demo', ['report.md', 'runs']) as w:\n"
            "    (w / 'report.md').write_text('half'); os._exit(9)")
    assert subprocess.run([sys.executable, "-c", code, str(out)]).returncode == 9
    assert (out / "report.md").read_text() == "half"  # killed half-way: the next job at this path puts it back
    check_output(out, "demo", overwrite=True)
    assert snapshot(out) == {"report.md": b"old report", "thesis.tex": b"years of work"}
    with rebuild_dir(out, "demo", ["report.md", "runs"]) as work:
        (work / "report.md").write_text("new")
    assert snapshot(out) == {"report.md": b"new", "thesis.tex": b"years of work",
                             OUTPUT_MARKER: (out / OUTPUT_MARKER).read_bytes()} and out.stat().st_ino == inode
    assert check_output(out, "demo") == out  # its own output now


def test_d8_eval_never_overwrites_a_users_plot_beside_its_result(run, tmp_path, capsys):
    res = tmp_path / "res.json"
    assert main(["eval", str(run), "--out", str(res), "--count", "4", "--sizes", "9"]) == 0
    assert main(["eval", str(run), "--out", str(res), "--count", "4", "--sizes", "9"]) == 0  # its own files
    (tmp_path / "res.png").write_bytes(b"the user's own figure")
    before = snapshot(tmp_path)
    line = refused(capsys, "eval", str(run), "--out", str(res), "--count", "4", "--sizes", "9")
    assert "res.png" in line and "--overwrite" in line
    assert snapshot(tmp_path) == before
    line = refused(capsys, "eval", str(run), "--out", str(tmp_path / "result.png"), "--count", "4", "--sizes", "9")
    assert "must be a .json path" in line and snapshot(tmp_path) == before
    (tmp_path / "new.png").write_bytes(b"mine too")  # a new result beside a user's plot of that name
    assert "new.png" in refused(capsys, "eval", str(run), "--out", str(tmp_path / "new.json"), "--count", "4")
    assert not (tmp_path / "new.json").exists()


def test_two_evals_to_one_out_and_eval_or_lsm_in_a_run_being_trained(run, tmp_path, capsys):
    res = tmp_path / "res.json"
    with output_lock(res, "eval output"):
        line = refused(capsys, "eval", str(run), "--out", str(res), "--count", "4", "--sizes", "9")
    assert f"PID {os.getpid()}" in line and not res.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # the lock file goes with its holder
    before = snapshot(run)
    with exclusive_lock(run, "run directory", "wait"):  # what training holds
        assert f"PID {os.getpid()}" in refused(capsys, "eval", str(run), "--count", "4", "--sizes", "9")
        assert f"PID {os.getpid()}" in refused(capsys, "lsm", str(run))
        assert main(["eval", str(run), "--out", str(res), "--count", "4", "--sizes", "9"]) == 0  # outside: fine
    assert snapshot(run) == before


# -- leftovers, disk full, read-only, Ctrl-C ----------------------------------------------------------
def dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_leftovers_of_any_dead_writer_are_cleaned_by_the_next_job_there(tmp_path):
    pid = dead_pid()
    (tmp_path / f".maze_data_train_401.{pid}.abc.tmp").mkdir()  # a killed `data mazes --size 401`
    (tmp_path / f".maze_data_train_401.{pid}.abc.tmp" / "inputs.npy").write_bytes(bytes(1000))
    assert main(["data", "prefix-sums", "--length", "8", "--count", "4", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prefix_sums_data"]


@pytest.mark.slow  # end-to-end (trains, or runs the CLI in a subprocess): make test-slow
def test_a_full_disk_ends_in_one_line_and_the_run_resumes(tmp_path):
    """A file-size limit (what `ulimit -f` sets) stands for a full disk: the first checkpoint cannot be
    written; one line, exit 2, no traceback, no temporaries; without the limit the run resumes."""
    import resource

    args = [sys.executable, "-m", "softshare", *TRAIN_TINY, "--width", "64", "--out-dir", str(tmp_path), "--name",
            "r", "--epochs", "2"]
    limit = 150_000  # config, metrics and the curves fit; the width-64 net's weights (~0.2 MB) do not
    full = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert full.returncode == 2 and full.stderr.count("\n") == 1 and "Traceback" not in full.stderr, full.stderr
    assert "file-size limit" in full.stderr and "--resume auto" in full.stderr
    assert [p for p in (tmp_path / "r").rglob("*") if p.name.endswith(".tmp") or ".old-" in p.name] == []
    done = subprocess.run(args + ["--resume", "auto"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last").meta["epoch"] == 2


WRITING_JOBS = {
    "train": lambda run, out: [*TRAIN_TINY, "--out-dir", str(out), "--name", "x", "--epochs", "1"],
    "eval": lambda run, out: ["eval", str(run), "--out", str(out / "r.json"), "--count", "4", "--sizes", "9"],
    "lsm": lambda run, out: ["lsm", str(run), "--out", str(out / "lsm")],
    "fold": lambda run, out: ["fold", str(run), "--out", str(out / "fold")],
    "share": lambda run, out: ["share", "wrn_16_1", "--out", str(out / "share")],
    "data": lambda run, out: ["data", "mazes", "--count", "2", "--out", str(out / "data")],
    "demo": lambda run, out: ["demo", "--out", str(out / "demo")],
    "experiment": lambda run, out: ["experiment", "recurrence", "--out", str(out / "study"), "--epochs", "1"],
    "convert-author": lambda run, out: ["convert-author", str(run / "missing.pth.tar"), "--model", "swrn_16_1_2",
                                        "--out", str(out / "conv")],
}


@pytest.mark.parametrize("job", WRITING_JOBS)
def test_a_read_only_place_is_one_line_before_any_work(job, run, tmp_path, capsys, monkeypatch):
    """Every writing job probes its output's place first (a read-only file system or no permission:
    what root cannot be shown with chmod, so the probe's failure is injected here)."""
    import softshare.storage

    real = softshare.storage.tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if Path(dir).resolve().is_relative_to(tmp_path.resolve()):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(softshare.storage.tempfile, "mkstemp", read_only)
    line = refused(capsys, *WRITING_JOBS[job](run, tmp_path))
    assert "read-only" in line, line
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_for_real(run, tmp_path, capsys):
    tmp_path.chmod(0o555)
    try:
        for job in WRITING_JOBS:
            assert "permission denied" in refused(capsys, *WRITING_JOBS[job](run, tmp_path))
    finally:
        tmp_path.chmod(0o755)


@pytest.mark.slow  # end-to-end (trains, or runs the CLI in a subprocess): make test-slow
def test_ctrl_c_pressed_twice_ends_in_one_line(tmp_path):
    """The first Ctrl-C saves a checkpoint, the second stops at once: either way one line, exit 130."""
    for gap in (0.0, 0.3):
        out = tmp_path / f"g{gap}"
        proc = subprocess.Popen([sys.executable, "-m", "softshare", "train", "--preset", "digits_tiny", "--epochs",
                                 "50", "--out-dir", str(out), "--name", "r", "--device", "cpu"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        while not (out / "r" / "metrics.jsonl").exists() and proc.poll() is None:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        time.sleep(gap)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate()
        assert proc.returncode == 130 and "Traceback" not in err and err.count("\n") <= 1, err


# -- resource budgets, before anything is allocated ------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (("--model-args", '{"width": 100000000}'), "width=100,000,000 is far beyond any model"),
    (("--model-args", '{"depth": 1000000000}'), "depth=1,000,000,000 is far beyond any model"),
    (("--model", "ff", "--width", "4096", "--depth", "10000"), "parameters (counted while building it on the meta"),
    (("--batch-size", "20", "--train-count", "99999999", "--train-size", "10000"), "needs about"),
])
def test_sizes_from_flags_are_refused_before_allocation(tmp_path, capsys, flags, message):
    line = refused(capsys, "train", "--task", "prefix-sums", "--device", "cpu", "--out-dir",
                   str(tmp_path / "new" / "runs"), "--name", "big", *flags)
    assert message in line
    assert not any(tmp_path.iterdir())  # no run directory left behind, not its lock, not the --out-dir made for it


def test_the_memory_budget_is_stated_and_overridable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SOFTSHARE_MEMORY_BUDGET", "0.001")  # 1 MiB: a width-64 net's training step is more
    line = refused(capsys, *TRAIN_TINY, "--width", "64", "--out-dir", str(tmp_path), "--name", "r", "--epochs", "1")
    assert "SOFTSHARE_MEMORY_BUDGET=0.001" in line and "needs about" in line and not any(tmp_path.iterdir())
    monkeypatch.setenv("SOFTSHARE_MEMORY_BUDGET", "8")
    assert main([*TRAIN_TINY, "--width", "64", "--out-dir", str(tmp_path), "--name", "r", "--epochs", "1"]) == 0


def test_sizes_from_files_are_refused_before_allocation(tmp_path, capsys):
    # a meta.json declaring a giant net (eval, lsm, fold and load() all build from it)
    save_checkpoint(tmp_path / "c", create_model("prefix_ff", num_classes=2, in_channels=1, width=4, depth=2))
    meta_path = tmp_path / "c" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "model": {**meta["model"], "width": 4096, "depth": 10000}}))
    with pytest.raises(SoftshareError, match="more than .* parameters"):
        load(tmp_path / "c")
    # a gzip bomb: a few KB whose IDX header promises gigabytes
    bomb = tmp_path / "bomb-idx3-ubyte.gz"
    with gzip.open(bomb, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + struct.pack(">3i", 1_000_000, 1000, 1000) + bytes(1 << 20))
    with pytest.raises(SoftshareError, match="declares 1,000,000,000,000 bytes"):
        read_idx(bomb)
    # an author file of 4 KB declaring a (1000000, 0) classifier
    author = create_model("swrn_16_1_2").state_dict()
    state = {"conv_3x3.weight": author["stem.weight"], "classifier.weight": torch.zeros(1_000_000, 0)}
    torch.save({"state_dict": state}, tmp_path / "evil.pth.tar")
    line = refused(capsys, "convert-author", str(tmp_path / "evil.pth.tar"), "--model", "swrn_16_1_2", "--out",
                   str(tmp_path / "out"))
    assert "needs" in line and "parameters" in line and not (tmp_path / "out").exists()
    # data larger than the disk
    assert "on disk" in refused(capsys, "data", "mazes", "--size", "401", "--count", "1000000", "--out",
                                str(tmp_path / "d"))
    assert not (tmp_path / "d").exists()


def test_a_state_with_an_impossible_position_is_refused_before_writing(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    state_path = copy / "checkpoints" / "last" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    torch.save({**state, "batch": 10 ** 9}, state_path)
    before = snapshot(copy)
    line = refused(capsys, "train", "--resume", str(copy), "--epochs", "3")
    assert "batch (1,000,000,000: an epoch of this run has" in line and snapshot(copy) == before


# -- no silent coercion, nothing written before validating, no traceback ---------------------------
@pytest.mark.parametrize("text, message", [
    ("lr_milestones: [1.7, 2.9]\n", "'lr_milestones' expects a list of int, got [1.7, 2.9]"),
    ("lr_milestones: [true]\n", "'lr_milestones' expects a list of int, got [True]"),
    ("test_sizes: \"99\"\n", "'test_sizes' expects a list of int, got '99'"),
    ("epochs: 2.5\n", "'epochs' expects int, got 2.5"),
    ("lr: !!python/object/apply:os.system [\"touch pwned\"]\n", "a tag softshare does not load"),
    ("lr: 1\n  bad: [\n", "at line 2, column 6: mapping values are not allowed here"),
])
def test_config_files_are_taken_as_written_or_refused_in_one_line(tmp_path, capsys, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(text)
    assert message in refused(capsys, "train", "--config", "c.yaml", "--out-dir", "runs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_a_binary_config_file_is_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_bytes(bytes(range(256)) * 4)
    assert "as UTF-8 text" in refused(capsys, "train", "--config", str(tmp_path / "c.yaml"))


def test_experiment_validates_every_value_before_writing(tmp_path, capsys):
    from softshare.studies.recurrence import check_study

    assert "finite" in refused(capsys, "experiment", "recurrence", "--lambdas", "inf", "--out", str(tmp_path / "ex"))
    with pytest.raises(SoftshareError, match="finite and non-negative"):
        check_study(tmp_path / "ex", ("mazes",), (math.inf,), (0,))
    assert not (tmp_path / "ex").exists()


def test_a_corrupt_metrics_file_is_refused_before_the_resume_writes(tmp_path, capsys):
    assert main([*TRAIN_TINY, "--out-dir", str(tmp_path), "--name", "r", "--epochs", "1"]) == 0
    (tmp_path / "r" / "metrics.jsonl").write_text("not json at all\n")
    before = snapshot(tmp_path)
    line = refused(capsys, "train", "--resume", str(tmp_path / "r"), "--epochs", "2")
    assert "metrics.jsonl line 1" in line and snapshot(tmp_path) == before


def test_tracebacks_of_the_battery_are_one_line(run, tmp_path, capsys):
    assert "far beyond any model" in refused(capsys, "params", "swrn_16_1_2", "--model-args",
                                             '{"num_templates": 1000000000}')
    assert "multiple values" in refused(capsys, "params", "swrn_16_1_2", "--model-args", '{"num_templates": 4}')
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    line = refused(capsys, "lsm", str(run), "--out", str(tmp_path / "link"))
    assert "symbolic link (to a directory" in line and "a file" not in line
    assert "--data cifar10 does not apply" in refused(capsys, "eval", str(run), "--data", "cifar10")


# -- resume: every case of the battery ---------------------------------------------------------------
def test_resume_refuses_a_preset_the_run_was_not_trained_with(tmp_path, capsys):
    assert main([*TRAIN_TINY, "--out-dir", str(tmp_path), "--name", "r", "--epochs", "1"]) == 0
    before = snapshot(tmp_path)
    line = refused(capsys, "train", "--resume", str(tmp_path / "r"), "--preset", "mazes_cpu")
    assert "not trained with --preset mazes_cpu" in line and "task (run: 'prefix-sums'" in line
    assert snapshot(tmp_path) == before


def test_resume_applies_runtime_changes_visibly_and_logs_to_train_log(tmp_path, capsys):
    assert main([*TRAIN_TINY, "--out-dir", str(tmp_path), "--name", "r", "--epochs", "1"]) == 0
    assert main(["train", "--resume", str(tmp_path / "r"), "--model", "recurrent", "--amp", "bf16",
                 "--epochs", "2"]) == 0  # --model as trained: no misleading "train it with --task"
    info = json.loads((tmp_path / "r" / "run_info.json").read_text())
    assert info["resumes"][-1]["changed"] == {"amp": ["auto", "bf16"], "epochs": [1, 2]}
    log_text = (tmp_path / "r" / "train.log").read_text()
    assert "resume: amp changed from auto to bf16" in log_text and "resume: epochs changed from 1 to 2" in log_text


def test_resume_refuses_other_data_and_accepts_the_same_data_moved(tmp_path, capsys):
    assert main([*TRAIN_TINY, "--out-dir", str(tmp_path), "--name", "r", "--epochs", "1"]) == 0
    # the run generated its 40 + 8 strings from seed 0; a data root holding the same, and other ones
    same, other = tmp_path / "same", tmp_path / "other"
    assert main(["data", "prefix-sums", "--length", "32", "--count", "48", "--seed", "0", "--out", str(same)]) == 0
    assert main(["data", "prefix-sums", "--length", "32", "--count", "48", "--seed", "7", "--out", str(other)]) == 0
    before = snapshot(tmp_path / "r")
    line = refused(capsys, "train", "--resume", str(tmp_path / "r"), "--data-root", str(other), "--epochs", "2")
    assert "holds other data" in line and snapshot(tmp_path / "r") == before
    assert main(["train", "--resume", str(tmp_path / "r"), "--data-root", str(same), "--epochs", "2"]) == 0
    assert "resume: data_root changed from None to" in (tmp_path / "r" / "train.log").read_text()


def test_resume_refuses_epochs_below_those_done(tmp_path, capsys):
    assert main([*TRAIN_TINY, "--out-dir", str(tmp_path), "--name", "r", "--epochs", "3"]) == 0
    before = snapshot(tmp_path)
    line = refused(capsys, "train", "--resume", str(tmp_path / "r"), "--epochs", "2")
    assert "has already trained 3 epochs; give --epochs 3 or more" in line and snapshot(tmp_path) == before
    assert main(["train", "--resume", str(tmp_path / "r")]) == 0  # all trained: nothing to do, nothing written
    assert "nothing to do" in capsys.readouterr().out and snapshot(tmp_path) == before
