"""The training path on real data: learning, exact resume, signals, DDP, config, bad input."""

from __future__ import annotations

import csv
import functools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import StopAfter, foreign, train_on_two_ranks
from softshare import SharedLayer, create_model, param_groups, share
from softshare.checkpoint import load_checkpoint
from softshare.errors import SoftshareError
from softshare.train.config import PRESETS, resolve_config
from softshare.train.loggers import make_sinks
import softshare.train.loop as loop
from softshare.train.distributed import DistInfo
from softshare.train.loop import make_task, train
from softshare.train.monitor import TrainingDiverged
from softshare.train.optim import build_optimizer

TINY = dict(dataset="digits", model="swrn_16_1_2", batch_size=64, lr=0.05, schedule="cosine",
            crop_padding=1, flip=False, device="cpu")  # digits_tiny's validation split: 237 of 1,437


def tiny_config(tmp_path: Path, **overrides):
    return resolve_config("digits_tiny", overrides={**TINY, "out_dir": str(tmp_path), "name": "run", **overrides})


def test_digits_learns_well_above_chance(tmp_path):
    result = train(tiny_config(tmp_path, epochs=4))
    assert result.final_metrics["val_acc"] >= 0.80  # 10 classes: chance is 0.10
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    info = json.loads((run / "run_info.json").read_text())
    assert info["torch_version"] == torch.__version__ and info["softshare_version"] and "CPU" in info["device"]
    assert json.loads((run / "config.json").read_text())["model"] == "swrn_16_1_2"
    assert (run / "curves.png").stat().st_size > 1000
    assert (run / "checkpoints" / "best" / "model.safetensors").exists()
    split = json.loads((run / "split.json").read_text())
    assert split["evaluated_on"] == "validation" and len(split["train_indices"]) == 1200
    assert len(split["val_indices"]) == 237 and not set(split["train_indices"]) & set(split["val_indices"])


def test_image_presets_hold_out_a_validation_split_and_say_its_size(tmp_path, caplog):
    assert resolve_config("fashion_mnist_cpu").val_size == 5000 and resolve_config("digits_tiny").val_size == 237
    with caplog.at_level("INFO", logger="softshare.train"):
        result = train(tiny_config(tmp_path, epochs=1))
    note = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("validation:"))
    assert "237 of the 1,437 digits training images held out" in note and "360 test images are not used" in note
    assert result.best_epoch == 1 and result.best_metric == result.final_metrics["val_acc"]
    assert "test_acc" not in result.final_metrics


def test_val_size_0_keeps_no_best_checkpoint_and_says_so(tmp_path, caplog):
    """Scored on the test set each epoch, a 'best' would be chosen on the test set: there is none."""
    with caplog.at_level("INFO", logger="softshare.train"):
        result = train(tiny_config(tmp_path, epochs=2, val_size=0))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["last"]
    assert result.best_metric is None and "val_acc" not in result.final_metrics
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all({"test_acc", "test_loss"} <= r.keys() and "val_acc" not in r for r in rows)
    assert any("no 'best' checkpoint is kept" in r.getMessage() and "360 test images" in r.getMessage()
               for r in caplog.records)
    assert json.loads((tmp_path / "run" / "split.json").read_text())["evaluated_on"] == "test"


@pytest.fixture
def restore_global_flags():
    """train() sets torch-wide determinism/cuDNN flags; put them back for the tests that follow."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark = saved[2]


@pytest.mark.slow  # bf16 is emulated on a CPU (and compiling takes its time): the GPU check runs it on CUDA
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_short_training_bf16_channels_last(device, tmp_path, compiled, monkeypatch, restore_global_flags):
    if compiled and device.type == "cpu":
        # Inductor's C++ build takes ~1 min on 2 cores; aot_eager traces the same graphs (dynamo and
        # AOT autograd through the bank) without code generation. CUDA runs the real inductor.
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    result = train(tiny_config(tmp_path, device=str(device), epochs=2, eval_every=1, amp="bf16",
                               channels_last=True, compile=compiled))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert result.final_metrics["val_acc"] > 0.3  # 10 classes: chance is 0.1
    assert all(p.device.type == device.type for p in result.model.parameters())
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert ("CUDA" in info["device"]) == (device.type == "cuda")


@pytest.mark.slow  # end-to-end (trains, or runs the CLI in a subprocess): make test-slow
def test_interrupted_and_resumed_run_ends_with_identical_weights(device, tmp_path, restore_global_flags):
    """Bit-identical on any device with deterministic algorithms on (amp auto: bf16 autocast on
    CUDA, fp32 on CPU)."""
    config = functools.partial(tiny_config, epochs=2, deterministic=True, device=str(device))
    straight = train(config(tmp_path / "a"))
    stopped = train(config(tmp_path / "b"), stop=StopAfter(30))
    assert stopped.interrupted  # 18 batches per epoch: stopped in epoch 2, step 12
    state = load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last").train_state
    assert (state["epoch"], state["batch"]) == (1, 13)
    resumed = train(config(tmp_path / "b"), resume="auto")
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    rows = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]


@pytest.mark.slow  # end-to-end (trains, or runs the CLI in a subprocess): make test-slow
def test_rates_after_a_mid_epoch_resume_count_the_whole_epoch(tmp_path, monkeypatch):
    """A clock that ticks once per reading makes the times exact: the epoch finished after a resume
    reports its seconds (before the stop and after it) and all its images over them."""
    import types

    import softshare.train.epoch as epoch_module

    ticks = iter(range(10 ** 6))
    monkeypatch.setattr(epoch_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    config = functools.partial(tiny_config, epochs=2, deterministic=True)
    train(config(tmp_path), stop=StopAfter(30))  # stopped after 13 of epoch 2's 18 batches
    before = load_checkpoint(tmp_path / "run" / "checkpoints" / "last").train_state["epoch_seconds"]
    train(config(tmp_path), resume="auto")
    row = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["epoch"] == 2 and row["seconds"] > before  # the part before the stop counts
    assert row["images_per_s"] == round(18 * 64 / row["seconds"], 1)  # every image of the epoch over them


@pytest.mark.slow  # two `softshare train` processes
def test_sigint_saves_a_checkpoint_and_resume_auto_continues(tmp_path):
    cmd = [sys.executable, "-m", "softshare", "train", "--preset", "digits_tiny", "--epochs", "50",
           "--out-dir", str(tmp_path), "--name", "sig", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "sig" / "metrics.jsonl"
    while not metrics.exists() and proc.poll() is None:  # however slow the machine: until epoch 1 is done
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate()
    assert proc.returncode == 130, out
    assert "resume" in out and "Traceback" not in out
    state = load_checkpoint(tmp_path / "sig" / "checkpoints" / "last").train_state
    assert state["epoch"] >= 1
    done = subprocess.run(cmd[:6] + ["--epochs", str(state["epoch"] + 1)] + cmd[8:] + ["--resume", "auto"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from" in done.stdout


@pytest.mark.slow  # torchrun with two processes
def test_two_process_ddp_with_gloo(tmp_path):
    train_on_two_ranks(tmp_path, {**TINY, "out_dir": str(tmp_path), "name": "ddp", "epochs": 3}, "digits_tiny")
    assert (tmp_path / "rank0.txt").read_text().endswith("ddp") and (tmp_path / "rank1.txt").read_text() == "None"
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # one writer: no duplicated rows
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert json.loads((tmp_path / "ddp" / "run_info.json").read_text())["world_size"] == 2


def test_config_precedence_and_errors(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("lr: 0.3\nepochs: 7\n")
    config = resolve_config("cifar10_swrn_28_10_2_cutout", str(file), {"epochs": 9})
    assert (config.cutout, config.lr, config.epochs, config.weight_decay) == (16, 0.3, 9, 5e-4)
    paper = resolve_config("cifar100_swrn_28_10_2")
    assert (paper.optimizer, paper.nesterov, paper.lr_milestones, paper.lr_gamma, paper.epochs, paper.dataset) == \
        ("sgd", True, [60, 120, 160], 0.2, 200, "cifar100")
    with pytest.raises(SoftshareError, match="did you mean: lr"):
        resolve_config(overrides={"lrr": 1})
    with pytest.raises(SoftshareError, match="unknown preset"):
        resolve_config("cifar10_swrn")
    (tmp_path / "bad.json").write_text('{"epochs": "many"}')
    with pytest.raises(SoftshareError, match="epochs"):
        resolve_config(config_file=str(tmp_path / "bad.json"))
    assert "fashion_mnist_cpu" in PRESETS


def test_divergence_stops_with_epoch_and_step(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step \d+"):
        train(tiny_config(tmp_path, epochs=1, lr=1e12, schedule="constant"))
    assert not (tmp_path / "run" / "checkpoints" / "last").exists()


def test_existing_or_unwritable_run_directory(tmp_path):
    train(tiny_config(tmp_path, epochs=1))
    with pytest.raises(SoftshareError, match="--resume auto"):
        train(tiny_config(tmp_path, epochs=1))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SoftshareError, match=r"cannot write .*file/run: .*file is a file, not a directory"):
        train(tiny_config(blocker, epochs=1))


@pytest.mark.slow  # end-to-end (trains, or runs the CLI in a subprocess): make test-slow
def test_lsm_every_records_the_emergence_of_recurrence(tmp_path):
    train(tiny_config(tmp_path, epochs=2, lsm_every=1))
    lsm = tmp_path / "run" / "lsm"
    epochs = [json.loads(line)["epoch"] for line in (lsm / "history.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]  # the starting point, then every epoch
    assert (lsm / "history.png").stat().st_size > 1000


@pytest.mark.parametrize("task, model", [("classification", "wrn_16_1"), ("prefix-sums", "recurrent")])
def test_lsm_every_on_a_model_without_banks_is_refused_before_anything_is_written(tmp_path, task, model):
    config = (tiny_config(tmp_path, epochs=1, lsm_every=1, model=model) if task == "classification" else
              resolve_config(None, overrides={"task": task, "model": model, "lsm_every": 1,
                                              "out_dir": str(tmp_path), "name": "run"}))
    with pytest.raises(SoftshareError, match=r"--lsm-every .* has none \(nothing in it is shared\)"):
        train(config)
    assert not (tmp_path / "run").exists()  # no run directory, not even a config.json


# -- optimizer groups -----------------------------------------------------------------------
def test_param_groups_put_exactly_the_coefficients_in_no_decay():
    model = nn.ModuleDict({"swrn": create_model("swrn_16_1_2"),
                           "foreign": share(foreign(torch.float32), 2, allow_growth=True)})
    model["foreign"].fc.weight.requires_grad_(False)  # frozen parameters go nowhere
    groups = param_groups(model, 5e-4)
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    coefficients = {id(m.coefficients) for m in model.modules() if isinstance(m, SharedLayer)}
    assert len(coefficients) == 3 * 2 + 7  # SWRN-16: 3 stages x one shared block x 2 convs
    assert no_decay == coefficients
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert decay == trainable - coefficients
    assert sum(len(g["params"]) for g in groups) == len(trainable)  # no duplicates (shared banks)
    assert id(model["foreign"].fc.weight) not in decay
    plain = param_groups(create_model("wrn_10_1"), 1e-4)
    assert len(plain) == 1 and plain[0]["weight_decay"] == 1e-4
    torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # accepted by an optimizer as is


@pytest.mark.slow  # end-to-end (trains, or runs the CLI in a subprocess): make test-slow
def test_loggers_ema_adamw_and_the_regulariser_logged_apart(tmp_path, caplog, monkeypatch):
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from softshare import load
    from softshare.analysis import recurrence_penalty

    config = tiny_config(tmp_path, epochs=2, optimizer="adamw", lr=3e-3, weight_decay=0.01, ema_decay=0.9,
                         recurrence_reg=0.5, logger=["jsonl", "csv", "tensorboard"], log_every=5)
    monkeypatch.setattr(loop, "PROGRESS_EVERY_S", 0.0)  # a progress line per step (default: one per 30 s)
    with caplog.at_level("INFO", logger="softshare.train"):
        result = train(config)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the penalty is logged as itself, the loss is the task loss alone
    assert all(0 <= r["train_recurrence_penalty"] <= 1 for r in rows)
    assert rows[-1]["train_recurrence_penalty"] == pytest.approx(
        float(recurrence_penalty(result.model)), abs=0.2)  # last-epoch mean vs final value
    # EMA: evaluated, and its weights saved apart from the model's
    assert {"ema_val_acc", "ema_val_loss"} <= rows[-1].keys()
    ema = load(run / "checkpoints" / "ema")
    model_weights = load_file(run / "checkpoints" / "last" / "model.safetensors")
    ema_weights = load_file(run / "checkpoints" / "ema" / "model.safetensors")
    assert model_weights.keys() == ema_weights.keys()
    assert any(not torch.equal(model_weights[k], ema_weights[k]) for k in model_weights)
    assert type(ema) is type(result.model)
    # CSV: the same rows and columns as metrics.jsonl
    with open(run / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["train_loss"]) for r in table] == [r["train_loss"] for r in rows]
    # TensorBoard: a scalar per metric, step = epoch
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("acc/val")] == [
        (r["epoch"], pytest.approx(r["val_acc"])) for r in rows]
    assert "recurrence_penalty/train" in events.Tags()["scalars"]
    # ... the training loss and lr every 5 optimizer steps, and the config as hparams and text
    per_epoch = make_task(config, torch.device("cpu"), DistInfo()).batches_per_epoch()
    assert [s.step for s in events.Scalars("step/lr")] == list(range(5, 2 * per_epoch + 1, 5))
    assert {"step/train_loss", "step/train_recurrence_penalty"} <= set(events.Tags()["scalars"])
    assert events.PluginTagToContent("hparams") and "config/text_summary" in events.Tags()["tensors"]
    # no terminal here: progress came as log lines with rate, ETA and the task's unit
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1/2: ")]
    assert lines and "step/s" in lines[0] and "ETA" in lines[0] and "images/s=" in lines[0]
    # AdamW: decoupled decay on weights, none on the sharing coefficients
    groups = load_checkpoint(run / "checkpoints" / "last").train_state["optimizer"]["param_groups"]
    assert all(g["decoupled_weight_decay"] for g in groups)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.01]


def test_adam_puts_decay_in_the_gradient_and_adamw_decouples_it():
    """One definition of each (train/optim.py): adam as DeepThinking (L2 in the gradient), adamw torch's."""
    model = create_model("swrn_16_1_2", num_classes=3)
    for name, kind, decoupled in (("adam", torch.optim.Adam, False), ("adamw", torch.optim.AdamW, True)):
        config = resolve_config(None, overrides={"optimizer": name, "weight_decay": 0.01, "lr": 1e-3})
        optimizer = build_optimizer(config, model)
        assert type(optimizer) is kind
        assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.01]  # none on coefficients
        assert all(bool(g.get("decoupled_weight_decay", False)) is decoupled for g in optimizer.param_groups)


def test_unknown_logger_is_one_line(tmp_path):
    with pytest.raises(SoftshareError, match="logger must be jsonl, csv, tensorboard or wandb, got 'mlflow'"):
        train(tiny_config(tmp_path, epochs=1, logger=["mlflow"]))  # refused when the config is resolved
    assert not any(tmp_path.iterdir())
    with pytest.raises(SoftshareError, match="unknown logger 'mlflow'"):
        make_sinks(["csv", "mlflow"], tmp_path, {})  # called directly


@pytest.mark.slow  # end-to-end (trains, or runs the CLI in a subprocess): make test-slow
def test_figures_in_the_run_s_format_with_the_label_smoothing_note(tmp_path, monkeypatch):
    from softshare.train import run_dir

    notes = []
    real = run_dir.curves_figure
    monkeypatch.setattr(run_dir, "curves_figure", lambda *a: notes.append(a[3]) or real(*a))
    train(tiny_config(tmp_path, epochs=1, lsm_every=1, figure_format="svg", label_smoothing=0.1))
    run = tmp_path / "run"
    assert (run / "curves.svg").read_bytes().startswith(b"<?xml") and not (run / "curves.png").exists()
    assert (run / "lsm" / "history.svg").exists() and list((run / "lsm" / "epoch_0001").glob("lsm_*.svg"))
    assert "label smoothing 0.1" in notes[-1] and "training loss is the higher one" in notes[-1]


def test_curves_are_redrawn_at_most_every_few_seconds_and_always_at_the_end(tmp_path, monkeypatch):
    from softshare.train import run_dir

    drawn = []
    monkeypatch.setattr(run_dir, "save_figure", lambda fig, path: drawn.append(len(fig.axes[0].lines[0].get_xdata())))
    run = run_dir.RunDir(tmp_path / "r")
    run.write_info({"epochs": 4}, torch.device("cpu"), 1)
    for epoch in (1, 2, 3):  # epochs far shorter than CURVES_EVERY_S
        run.append_metrics({"epoch": epoch, "train_loss": 1.0, "train_acc": 0.5})
        run.plot_curves()
    assert drawn == [1]  # the first epoch only
    run.close()
    assert drawn == [1, 3]  # what was not drawn is drawn at the end
    run = run_dir.RunDir(tmp_path / "r")
    run.write_info({"epochs": 4}, torch.device("cpu"), 1)
    run.plot_curves()
    run.append_metrics({"epoch": 4, "train_loss": 1.0, "train_acc": 0.5})
    run.plot_curves()  # the last epoch: drawn at once
    assert drawn == [1, 3, 3, 4]
    run.close()


def test_curves_of_several_runs_share_axes():
    from softshare.train.run_dir import curves_figure

    rows = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 0.5 / e, "train_acc": 0.8, "val_acc": 0.9} for e in (1, 2)]
    fig = curves_figure({"SWRN": rows, "WRN": rows}, "both", "test", note="a note")
    loss, acc = fig.axes
    assert [t.get_text() for t in acc.get_legend().get_texts()] == ["SWRN, train", "SWRN, test", "WRN, train",
                                                                    "WRN, test"]
    assert [line.get_linestyle() for line in acc.lines] == ["--", "-", "--", "-"]  # train dashed
    assert acc.lines[0].get_color() == acc.lines[1].get_color() != acc.lines[2].get_color()  # a colour per run
    assert fig.get_supxlabel() == "a note"


def test_curves_figure_names_the_split_in_percent_with_whole_epochs():
    from softshare.train.run_dir import curves_figure

    rows = [{"epoch": e, "train_loss": 1.0 / e, "test_loss": 1.2 / e, "train_acc": 0.0001 * e,
             "test_acc": 0.0002 * e, "train_recurrence_penalty": 0.1 / e} for e in (1, 2, 3)]
    fig = curves_figure({"run": rows}, "run")  # the split named by the rows' keys
    loss, acc, penalty = fig.axes
    assert [t.get_text() for t in acc.get_legend().get_texts()] == ["train", "test"]
    assert acc.get_ylabel() == "accuracy (%)" and acc.lines[1].get_ydata()[-1] == pytest.approx(0.06)
    low, high = acc.get_ylim()
    assert low <= 0 and high >= 100  # a maze net at 0.06% is shown as the near-zero it is
    assert all(float(t).is_integer() for t in loss.get_xticks())
    assert penalty.get_title() == "recurrence penalty" and loss.get_ylabel() == "task loss"
