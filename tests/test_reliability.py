"""Never lose a user's data (issue 10): outputs that refuse to clobber, crash-safe checkpoints
(kill-torture), one writer per run, every bad value refused before anything is written, explicit
resume, divergence detection. Every refusal: exit code 2, one line on stderr, nothing written."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from helpers import TINY, tiny

from softshare.checkpoint import load, load_checkpoint, save_checkpoint
from softshare.cli import main
from softshare.data.dataset import split_indices
from softshare.data.idx import read_idx
from softshare.errors import SoftshareError
from softshare.storage import (OUTPUT_MARKER, atomic_path, check_output, exclusive_lock, mark_output,
                          recover_leftovers)
from softshare.models import create_model
from softshare.train.config import RANGES, TrainConfig
from softshare.train.config_help import FIELD_CHOICES
from softshare.train.loop import train
from softshare.train.monitor import SPIKE_STEPS, LossMonitor, TrainingDiverged


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
def test_demo_refuses_a_foreign_directory_and_a_file(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    assert "--overwrite" in refused(capsys, "demo", "--out", str(mine))
    assert "is a file" in refused(capsys, "demo", "--out", str(tmp_path / "file"))
    assert snapshot(tmp_path) == before


def test_eval_out_refuses_a_directory_and_a_foreign_file(run, tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "keep").write_text("keep")
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    before = snapshot(tmp_path)
    assert "is a directory, not a file" in refused(capsys, "eval", str(run), "--out", str(tmp_path / "dir"))
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
    driver = Path(__file__).with_name("kill_torture.py")
    out = subprocess.run([sys.executable, str(driver), str(tmp_path), "0", "5"], capture_output=True, text=True,
                         timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    named = [code for point, code in result["codes"] if point != "random"]
    assert named == [86] * len(named), result["codes"]  # every injected point was reached and killed it
    assert result["final"] == 0 and result["equal"], result
    assert result["epochs"] == [1, 2, 3, 4] and result["leftovers"] == []
    assert result["best_epoch"] >= result["last_records_best_epoch"]


def test_a_kill_during_the_first_checkpoint_leaves_a_resumable_run(tmp_path, capsys):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SOFTSHARE_CRASH_AT": "weights@last"}
    code = "from helpers import tiny; from softshare.train.loop import train; train(tiny(%r, name='run'))"
    died = subprocess.run([sys.executable, "-c", code % str(tmp_path)], env=env, cwd=Path(__file__).parent,
                          capture_output=True, timeout=1200)
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
    train(tiny(tmp_path, name="scaled", epochs=1, lr=0.004, lr_reference_batch=4 * TINY["batch_size"]),
          resume="auto", changes={"lr": 0.004, "lr_reference_batch": 4 * TINY["batch_size"]})
    info = json.loads((tmp_path / "scaled" / "run_info.json").read_text())
    assert info["resumes"][-1]["changed"] == {}
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
