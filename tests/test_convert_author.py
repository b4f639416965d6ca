"""Converting the paper's reference checkpoints: same logits, and no pickled code runs.

The reference network below is written from the reference implementation's description (its
module names give the file's keys); the checkpoint files are real torch.save pickles holding
what the reference main.py saves, plus hostile objects.
"""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from softshare.checkpoint import load, load_checkpoint
from softshare.cli import main
from softshare.convert_author import Opaque, convert_author, read_author_checkpoint
from softshare.errors import SoftshareError


class RefBank(nn.Module):
    def __init__(self, k: int, channels: int):
        super().__init__()
        self.templates = nn.Parameter(torch.randn(k, channels, channels, 3, 3) * 0.05)


class RefSConv2d(nn.Module):
    def __init__(self, bank: RefBank):
        super().__init__()
        self.bank = bank
        self.coefficients = nn.Parameter(torch.randn(bank.templates.shape[0], 1, 1, 1, 1))

    def forward(self, x):
        return F.conv2d(x, (self.bank.templates * self.coefficients).sum(0), padding=1)


class RefBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, bank: RefBank | None = None):
        super().__init__()
        self.bank = bank
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = RefSConv2d(bank) if bank else nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = RefSConv2d(bank) if bank else nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        residual = x if self.equal else out  # a projecting block reads the pre-activated input
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + (self.convShortcut(residual) if self.convShortcut is not None else residual)


class RefSWRN(nn.Module):
    def __init__(self, depth: int, width: int, k: int | None, num_classes: int = 10):
        super().__init__()
        n = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.conv_3x3 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        for s, stride in zip((1, 2, 3), (1, 2, 2)):
            bank = RefBank(k, channels[s]) if k else None
            if bank is not None:
                setattr(self, f"bank_{s}", bank)
            blocks = [RefBlock(channels[s - 1], channels[s], stride)]
            blocks += [RefBlock(channels[s], channels[s], 1, bank) for _ in range(n - 1)]
            setattr(self, f"stage_{s}", nn.Sequential(*blocks))
        self.lastact = nn.Sequential(nn.BatchNorm2d(channels[3]), nn.ReLU())
        self.classifier = nn.Linear(channels[3], num_classes)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "templates" not in name:
                    p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 1.0))
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.num_batches_tracked.fill_(7)

    def forward(self, x):
        x = self.stage_3(self.stage_2(self.stage_1(self.conv_3x3(x))))
        return self.classifier(F.avg_pool2d(self.lastact(x), 8).flatten(1))


class DataParallelLike(nn.Module):  # gives the `module.` prefix of nn.DataParallel
    def __init__(self, net: nn.Module):
        super().__init__()
        self.module = net


X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _reference_file(path, net, monkeypatch, marker, zipfile=True):
    """torch.save what the reference main.py saves, plus objects whose unpickling would run code."""

    class RecorderMeter:
        def __init__(self, epochs):
            self.total_epoch, self.current_epoch = epochs, 3
            self.epoch_losses = np.zeros((epochs, 2), dtype=np.float32) - 1
            self.epoch_accuracy = np.arange(epochs * 2, dtype=np.float32).reshape(epochs, 2)

    class Payload:
        def __init__(self, fn, arg):
            self.fn, self.arg = fn, arg

        def __reduce__(self):
            return self.fn, (self.arg,)

    RecorderMeter.__module__, RecorderMeter.__qualname__ = "utils", "RecorderMeter"
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    net(X.float()).sum().backward()
    opt.step()
    net.zero_grad()
    wrapped = DataParallelLike(net)
    obj = {"epoch": 3, "arch": "swrn", "state_dict": wrapped.state_dict(), "optimizer": opt.state_dict(),
           "recorder": RecorderMeter(5), "curve": np.linspace(0, 1, 4),
           "payload": Payload(os.system, f"touch {marker}"),
           "payload2": Payload(eval, f"open({str(marker)!r}, 'w')")}
    with monkeypatch.context() as patch:  # `utils` exists only while saving, as on the author's machine
        utils = types.ModuleType("utils")
        utils.RecorderMeter = RecorderMeter
        patch.setitem(sys.modules, "utils", utils)
        torch.save(obj, path, _use_new_zipfile_serialization=zipfile)
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    torch.manual_seed(0)
    net = RefSWRN(16, 2, 2).eval()
    tmp = tmp_path_factory.mktemp("ref")
    with pytest.MonkeyPatch.context() as monkeypatch:
        path = _reference_file(tmp / "checkpoint.pth.tar", net, monkeypatch, tmp / "pwned")
    return net, path, tmp / "pwned"


def _same_logits(net, out):
    model = load(out).double()
    with torch.no_grad():
        assert torch.allclose(model(X), net.double()(X), rtol=1e-9, atol=1e-9)


def test_shared_conversion_same_logits(shared, tmp_path):
    net, path, marker = shared
    assert "module.stage_1.1.conv1.bank.templates" in read_author_checkpoint(path)["state_dict"]
    out = convert_author(path, "swrn_16_2_2", tmp_path / "converted")
    assert not marker.exists()
    ckpt = load_checkpoint(out)
    assert ckpt.meta["model"]["name"] == "swrn_16_2_2" and ckpt.meta["epoch"] == 3
    assert ckpt.state_dict["stages.0.blocks.1.conv1.coefficients"].shape == (2,)
    _same_logits(net, out)


def test_reading_runs_no_pickled_code(shared, monkeypatch):
    _, path, marker = shared
    raw = read_author_checkpoint(path)
    assert not marker.exists()
    assert isinstance(raw["payload"], Opaque) and raw["payload"].qualname.endswith(".system")
    assert isinstance(raw["payload2"], Opaque) and raw["payload2"].qualname.endswith(".eval")
    recorder = raw["recorder"]
    assert isinstance(recorder, Opaque) and recorder.qualname == "utils.RecorderMeter"
    assert np.array_equal(recorder.state["epoch_accuracy"], np.arange(10, dtype=np.float32).reshape(5, 2))
    assert np.array_equal(raw["curve"], np.linspace(0, 1, 4))
    assert raw["optimizer"]["param_groups"][0]["nesterov"] is True
    # Control: an unrestricted load of the same file does run the payload.
    monkeypatch.setitem(sys.modules, "utils", types.ModuleType("utils"))
    sys.modules["utils"].RecorderMeter = type("RecorderMeter", (), {})
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()


def test_unshared_legacy_format(tmp_path, monkeypatch):
    torch.manual_seed(1)
    net = RefSWRN(16, 2, None, num_classes=5).eval()
    path = _reference_file(tmp_path / "model_best.pth.tar", net, monkeypatch, tmp_path / "pwned", zipfile=False)
    out = convert_author(path, "wrn_16_2", tmp_path / "converted")
    assert not (tmp_path / "pwned").exists()
    assert load_checkpoint(out).meta["model"]["num_classes"] == 5
    _same_logits(net, out)


@pytest.mark.parametrize("model, message", [
    ("swrn_16_1_2", r"60 wrong shapes \(bank_1.templates \(2, 32, 32, 3, 3\) vs \(2, 16, 16, 3, 3\)"),
    ("swrn_22_2_2", r"missing tensors \(stages.0.blocks.2"),
    ("swrn_16_2_3", r"wrong shapes \(bank_1.templates \(2, 32, 32, 3, 3\) vs \(3, 32, 32, 3, 3\)"),
    ("wrn_16_2", r"unexpected tensors \(bank_1.templates"),
])
def test_incompatible_file(shared, tmp_path, model, message):
    _, path, _ = shared
    with pytest.raises(SoftshareError, match=rf"does not fit {model}: .*{message}.*"
                                             r"this looks like swrn_16_2_2: rerun with --model swrn_16_2_2"):
        convert_author(path, model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_reference_file(tmp_path):
    torch.save({"weights": [1, 2]}, tmp_path / "other.pt")
    with pytest.raises(SoftshareError, match="holds no 'state_dict'"):
        convert_author(tmp_path / "other.pt", "swrn_16_2_2", tmp_path / "out")
    (tmp_path / "cut.pth.tar").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SoftshareError, match="cannot read .*cut.pth.tar as a PyTorch checkpoint"):
        convert_author(tmp_path / "cut.pth.tar", "swrn_16_2_2", tmp_path / "out")


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
