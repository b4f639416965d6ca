"""train/imagefolder.py: --dataset imagefolder trains a small bottleneck SWRN on a tiny generated
ImageFolder (one process and 2-process gloo DDP), resumes mid-epoch exactly, counts and logs bad
files without stopping, and the ImageNet presets with linear lr scaling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import StopAfter, add_bad_files, train_on_two_ranks
from softshare import create_model
from softshare.checkpoint import load_checkpoint
from softshare.errors import SoftshareError
from softshare.eval import evaluate_checkpoint, evaluator_for
from softshare.train.config import resolve_config
from softshare.train.loop import train
from softshare.train.optim import scale_lr

TINY = dict(dataset="imagefolder", model="swrn_26_1_2", model_args={"base_width": 8}, image_size=32, batch_size=16,
            epochs=12, lr=0.05, warmup_epochs=1.0, schedule="cosine", weight_decay=5e-4, workers=1, device="cpu")


def tiny_config(tmp_path: Path, root: Path, **overrides):
    return resolve_config(overrides={**TINY, "data_root": str(root), "out_dir": str(tmp_path), "name": "run",
                                     **overrides})


@pytest.mark.slow  # 12 epochs with a DataLoader worker process
def test_tiny_imagefolder_trains_well_above_chance(imagefolder, tmp_path):
    result = train(tiny_config(tmp_path, imagefolder))
    assert result.final_metrics["val_acc"] >= 0.55  # 4 classes: chance 0.25
    assert result.final_metrics["val_count"] == 64
    classes = json.loads((tmp_path / "run" / "classes.json").read_text())
    assert classes["classes"] == ["class_1", "class_3", "class_7", "class_8"] and classes["train_images"] == 192
    scored = evaluate_checkpoint(str(tmp_path / "run"), device="cpu", batch_size=10)  # softshare eval: best
    assert scored["dataset"] == "imagefolder" and scored["skipped_files"] == 0
    assert scored["count"] == 64 and scored["acc"] == pytest.approx(result.best_metric, abs=1e-12)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    with pytest.raises(SoftshareError, match="built for 3 classes"):
        evaluator_for(config, "cpu")(create_model("swrn_26_1_2", num_classes=3, base_width=8))


@pytest.mark.slow  # end-to-end (trains, or runs the CLI in a subprocess): make test-slow
def test_bad_files_are_counted_and_logged_once_per_epoch(imagefolder, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(imagefolder, root)
    kinds = add_bad_files(root)
    result = train(tiny_config(tmp_path, root, epochs=2))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    bad = sorted(name for name, kind in kinds.items() if kind == "bad")
    assert [r["train_skipped_files"] for r in rows] == [3, 3] and [r["val_skipped_files"] for r in rows] == [3, 3]
    assert rows[-1]["val_count"] == 4 * 16 + 3  # the decodable odd files are scored, the broken ones not
    log = (tmp_path / "run" / "train.log").read_text()
    skip_lines = [line for line in log.splitlines() if "unreadable" in line]
    assert len(skip_lines) == 4  # once per split and epoch
    assert "epoch 1: 3 unreadable training file(s)" in log and "3 unreadable validation file(s)" in log
    assert all(name in log for name in bad)
    assert not any(name in log for name, kind in kinds.items() if kind == "ok")
    assert result.epochs_done == 2


@pytest.mark.slow  # end-to-end (trains, or runs the CLI in a subprocess): make test-slow
def test_resume_mid_epoch_gives_identical_weights(imagefolder, tmp_path):
    straight = train(tiny_config(tmp_path / "a", imagefolder, epochs=2, deterministic=True))
    stopped = train(tiny_config(tmp_path / "b", imagefolder, epochs=2, deterministic=True), stop=StopAfter(16))
    assert stopped.interrupted
    state = load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last").train_state
    assert (state["epoch"], state["batch"]) == (1, 5)  # 12 batches per epoch
    resumed = train(tiny_config(tmp_path / "b", imagefolder, epochs=2, deterministic=True), resume="auto")
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # torchrun with two processes
def test_two_process_gloo_run_ends_with_identical_weights(imagefolder, tmp_path):
    train_on_two_ranks(tmp_path, {**TINY, "data_root": str(imagefolder), "out_dir": str(tmp_path), "name": "ddp",
                                  "epochs": 2, "batch_size": 8, "lr": 0.05, "lr_reference_batch": 8})
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["val_count"] == 64  # sharded, counts all-reduced
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["lr"] == pytest.approx(0.1) and config["lr_reference_batch"] == 0  # 0.05 x (8 x 2) / 8


def test_imagenet_presets_and_linear_lr_scaling():
    for name, model in (("imagenet_swrn_50_2_2", "swrn_50_2_2"), ("imagenet_wrn_50_2", "wrn_50_2")):
        c = resolve_config(name)
        assert (c.model, c.dataset, c.epochs, c.lr_milestones, c.lr_gamma, c.weight_decay, c.nesterov) == \
            (model, "imagefolder", 90, [30, 60, 80], 0.1, 1e-4, True)
        assert (c.image_size, c.amp, c.channels_last, c.optimizer, c.batch_size) == (224, "auto", True, "sgd", 256)
        eight = scale_lr(c, 8)  # 8 GPUs x 256 = 2048 images per step
        assert eight.lr == pytest.approx(0.8) and eight.lr_reference_batch == 0
    assert resolve_config("imagenet_wrn_50_2", overrides={"label_smoothing": 0.1}).label_smoothing == 0.1
