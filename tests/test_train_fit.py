"""softshare.fit: a model softshare did not build, trained on the caller's data through the one
training loop: run directory, exact resume after kill -9 and after a stop request, LSM history of
every bank, the regulariser; and the caller's own loss and batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import softshare
from helpers import FASHION, TinyResNet
from softshare.errors import SoftshareError

JOB = Path(__file__).with_name("fit_job.py")


def fit_job(out: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "KILL_AT"}
    env.update(OMP_NUM_THREADS="1", **({"KILL_AT": kill_at} if kill_at else {}))
    return subprocess.run([sys.executable, str(JOB), str(out)], capture_output=True, text=True, env=env,
                          cwd=JOB.parent)


@pytest.mark.slow  # four processes, each loading Fashion-MNIST: about a minute
@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                    reason="needs Debian's dataset-fashion-mnist (make test installs it)")
def test_a_shared_resnet_trains_resumes_after_kill_9_and_draws_its_lsm_history(tmp_path):
    straight = fit_job(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = fit_job(tmp_path / "killed", kill_at="1,3")  # SIGKILL in the second epoch, after a checkpoint
    assert killed.returncode == -9
    stopped = fit_job(tmp_path / "killed", kill_at="1,2,INT")  # resumed; then a stop request mid-epoch 3
    assert stopped.returncode != 0 and "KeyboardInterrupt" in stopped.stderr
    meta = softshare.read_meta(tmp_path / "killed" / "resnet" / "checkpoints" / "last")
    assert (meta["epoch"], meta["step"]) == (2, 3)  # saved mid-epoch: 2 epochs and 3 batches done
    finished = fit_job(tmp_path / "killed")
    assert finished.returncode == 0, finished.stderr[-3000:]
    a, b = (load_file(p / "resnet" / "checkpoints" / "last" / "model.safetensors")
            for p in (tmp_path / "straight", tmp_path / "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exact, through both interruptions

    run = tmp_path / "killed" / "resnet"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert max(r["val_acc"] for r in rows) >= 0.4  # 10 classes of real clothes (chance 0.1), 48 steps
    assert all(0 < r["train_recurrence_penalty"] < 1 for r in rows)
    history = [json.loads(line) for line in (run / "lsm" / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]  # each epoch once, re-trained ones not twice
    assert {b["bank"] for b in history[-1]["banks"]} == {b["bank"] for b in history[0]["banks"]} and history[0]["banks"]
    assert (run / "lsm" / "history.png").stat().st_size > 1000
    model = softshare.share(TinyResNet(width=8), 2)  # rebuilt as before fit, the weights loaded into it
    softshare.load_into(model, run)
    assert json.loads((run / "run_info.json").read_text())["resumes"]


def _classification_data(n: int = 96):
    torch.manual_seed(0)
    x = torch.randn(n, 1, 8, 8)
    y = (x[:, 0, :4].mean(dim=(1, 2)) > x[:, 0, 4:].mean(dim=(1, 2))).long()  # top half brighter
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def test_fit_learns_with_its_own_loss_and_refuses_what_it_cannot_do(tmp_path):
    batches = _classification_data()
    model = TinyResNet(num_classes=2, width=4, depth=1)
    run = softshare.fit(model, batches, batches, epochs=4, lr=0.05, optimizer="adam", out_dir=tmp_path, device="cpu")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_acc"] >= 0.8 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert run == tmp_path / "tinyresnet" and (run / "checkpoints" / "best").is_dir()
    assert json.loads((run / "config.json").read_text())["task"] == "custom"

    mse = softshare.fit(nn.Linear(3, 1), [(torch.ones(4, 3), torch.zeros(4, 1))], [(torch.ones(2, 3), torch.zeros(2, 1))],
                        loss=nn.functional.mse_loss, epochs=2, lr=0.1, out_dir=tmp_path, name="mse", device="cpu")
    rows = [json.loads(line) for line in (mse / "metrics.jsonl").read_text().splitlines()]
    assert "val_acc" not in rows[-1] and "train_acc" not in rows[-1] and rows[-1]["val_loss"] >= 0
    with pytest.raises(SoftshareError, match="already holds a run"):
        softshare.fit(model, batches, epochs=1, out_dir=tmp_path, device="cpu")
    with pytest.raises(SoftshareError, match="iterator"):
        softshare.fit(model, iter(batches), epochs=1, out_dir=tmp_path, name="other", device="cpu")
    with pytest.raises(SoftshareError, match="unknown config key"):
        softshare.fit(model, batches, epoch=1, out_dir=tmp_path, name="other", device="cpu")
    with pytest.raises(SoftshareError, match="TinyResNet has none; share it first"):
        softshare.fit(model, batches, epochs=1, lsm_every=1, out_dir=tmp_path, name="other", device="cpu")
    assert not (tmp_path / "other").exists()


def test_fit_takes_mapping_batches_whose_model_returns_its_loss(tmp_path):
    class Returns(nn.Module):  # a transformers-style model: model(**batch).loss
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 1)

        def forward(self, inputs, labels):
            return {"loss": nn.functional.mse_loss(self.linear(inputs), labels)}

    gen = torch.Generator().manual_seed(0)  # fixed data and start: the loss must fall on every run
    batches = [{"inputs": torch.randn(8, 2, generator=gen), "labels": torch.zeros(8, 1)} for _ in range(3)]
    model = Returns()
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor([[1.0, -1.0]]))
        model.linear.bias.fill_(0.5)
    run = softshare.fit(model, batches, batches, epochs=3, lr=0.1, out_dir=tmp_path, device="cpu")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
