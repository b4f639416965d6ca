"""softshare.train.lightning: the callback in a real lightning.Trainer on CPU: the LSM history, the
regulariser's gradient, coefficients without weight decay, unshare at the end, and a run that resumes
after kill -9 from Lightning's last checkpoint with its LSM history intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

lightning = pytest.importorskip("lightning", reason="the lightning extra is not installed "
                                                    "(pip install 'softshare[lightning]'; make test installs it)")

import softshare  # noqa: E402
from helpers import TinyResNet, brighter_half  # noqa: E402
from softshare.analysis import recurrence_penalty  # noqa: E402
from softshare.errors import SoftshareError  # noqa: E402
from softshare.layers import SharedLayer, named_banks  # noqa: E402
from softshare.train.lightning import SoftshareCallback  # noqa: E402

JOB = Path(__file__).with_name("lightning_job.py")


class Classifier(lightning.LightningModule):
    def __init__(self, scheduler: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = softshare.share(TinyResNet(num_classes=2, width=4, depth=2), 2)
        self.scheduler = scheduler

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, index):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, weight_decay=5e-4)
        if not self.scheduler:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1)}


def trainer(tmp_path: Path, callback: SoftshareCallback, epochs: int = 2) -> lightning.Trainer:
    return lightning.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[callback])


def loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*brighter_half(64)), batch_size=16)


@pytest.mark.slow  # end-to-end (trains, or runs the CLI in a subprocess): make test-slow
def test_callback_records_lsm_history_moves_coefficients_out_of_decay_and_unshares(tmp_path):
    model = Classifier()
    shared = sum(isinstance(m, SharedLayer) for m in model.modules())  # 4 convs of stage 1, 3 of stage 2
    callback = SoftshareCallback(recurrence_reg=0.1, unshare=True, figure_format="svg")
    fit = trainer(tmp_path, callback)
    fit.fit(model, loader())
    history = [json.loads(line) for line in (tmp_path / "lsm" / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1, 2] and len(history[0]["banks"]) == 2  # one bank per stage
    assert (tmp_path / "lsm" / "history.svg").read_text().lstrip().startswith("<?xml")  # the format asked for
    assert [p.suffix for p in (tmp_path / "lsm" / "epoch_0002").iterdir()] == [".svg", ".svg"]  # one per bank
    groups = fit.optimizers[0].param_groups
    coefficient_groups = [g for g in groups if g["weight_decay"] == 0]
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0] and len(coefficient_groups[0]["params"]) == shared == 7
    assert float(fit.callback_metrics["train_recurrence_penalty"]) > 0
    assert not named_banks(model) and not any(isinstance(m, SharedLayer) for m in model.modules())  # unshared


def test_the_regulariser_adds_the_gradient_of_its_weighted_penalty():
    """on_after_backward: loss.backward() then the callback equals (loss + 0.3 * penalty).backward()."""
    model = Classifier()
    x, y = brighter_half(16)

    class Stub:  # what the hook reads of the trainer
        accumulate_grad_batches = 2
        precision_plugin = None

    def grads(with_callback: bool, **shape) -> list[torch.Tensor]:
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) / 2
        if with_callback:
            loss.backward()
            model.log = lambda *args, **kwargs: None
            SoftshareCallback(recurrence_reg=0.3, **{f"recurrence_{k}": v for k, v in shape.items()}).on_after_backward(
                Stub(), model)
        else:
            (loss + 0.3 / 2 * recurrence_penalty(model, **shape)).backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b)
    for a, b in zip(grads(True, reach=2, signed=True), grads(False, reach=2, signed=True)):  # as `softshare train`
        torch.testing.assert_close(a, b)


def test_the_regulariser_weight_follows_softshare_trains_schedule():
    """start / warmup / anneal: the same weight at the same (fractional) epoch as `softshare train`."""
    from softshare.train.config import resolve_config
    from softshare.train.epoch import recurrence_weight
    model = Classifier()
    schedule = dict(recurrence_reg_start=1, recurrence_reg_warmup=2, recurrence_reg_anneal=6)
    callback = SoftshareCallback(recurrence_reg=0.3, **schedule)
    config = resolve_config("prefix_sums_cpu", overrides=dict(recurrence_reg=0.3, **schedule))
    seen = []
    model.log = lambda *args, **kwargs: None

    class Stub:  # what the hooks read of the trainer: 4 batches an epoch
        accumulate_grad_batches, precision_plugin, num_training_batches = 1, None, 4

    x, y = brighter_half(16)
    for epoch, index in ((0, 3), (1, 2), (2, 0), (3, 2), (5, 2), (6, 0)):
        Stub.current_epoch = epoch
        callback.on_train_batch_start(Stub(), model, None, index)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        plain = [p.grad.clone() for p in model.parameters()]
        callback.on_after_backward(Stub(), model)
        moved = sum((p.grad - g).norm() for p, g in zip(model.parameters(), plain))
        seen.append((float(moved) > 0, recurrence_weight(config, epoch + index / 4)))
    assert [w for _, w in seen] == pytest.approx([0.0, 0.3 * 0.25 * 0.75, 0.3 * 0.5 * 4 / 6, 0.3 * 2.5 / 6, 0.3 * 0.5 / 6, 0.0])  # by hand
    assert [m for m, _ in seen] == [w > 0 for _, w in seen]  # the penalty acts exactly where its weight is > 0
    with pytest.raises(SoftshareError, match="must be >= 0"):
        SoftshareCallback(recurrence_reg=1, recurrence_reg_warmup=-1)


def test_a_scheduler_over_decayed_coefficients_is_refused_with_the_helper_named(tmp_path):
    with pytest.raises(SoftshareError, match="softshare.param_groups"):
        trainer(tmp_path, SoftshareCallback(), epochs=1).fit(Classifier(scheduler=True), loader())
    with pytest.raises(SoftshareError, match="figure format must be one of png, pdf, svg, got 'jpg'"):
        SoftshareCallback(figure_format="jpg")
    with pytest.raises(SoftshareError, match="share it first"):
        trainer(tmp_path, SoftshareCallback(), epochs=1).fit(_Plain(), loader())


class _Plain(Classifier):
    def __init__(self):
        super().__init__()
        self.net = TinyResNet(num_classes=2, width=4, depth=1)


@pytest.mark.slow  # three processes, each starting Lightning
def test_a_lightning_run_resumes_after_kill_9_with_its_lsm_history(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, str(JOB), str(tmp_path)], capture_output=True, text=True,
                            env={**env, "KILL_AT": "1,3"}, cwd=JOB.parent)
    assert killed.returncode == -9, killed.stderr[-2000:]
    history = [json.loads(line)["epoch"] for line in (tmp_path / "lsm" / "history.jsonl").read_text().splitlines()]
    assert history == [0, 1]  # the first epoch recorded before the kill
    done = subprocess.run([sys.executable, str(JOB), str(tmp_path)], capture_output=True, text=True,
                          env=env, cwd=JOB.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["val_acc"] >= 0.65  # chance: 0.5 (measured 0.70: 24 steps of a tiny net)
    history = [json.loads(line)["epoch"] for line in (tmp_path / "lsm" / "history.jsonl").read_text().splitlines()]
    assert history == [0, 1, 2, 3]  # continued from the last checkpoint, no epoch twice
