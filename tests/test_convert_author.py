"""Converting the paper's reference checkpoints: same logits, and no pickled code runs.

The reference network below is written from the reference implementation's description (its
module names give the file's keys); the checkpoint files are real torch.save pickles holding
what the reference main.py saves, plus hostile objects.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from helpers import X, RefSWRN, _reference_file
from softshare.checkpoint import load, load_checkpoint
from softshare.convert.author import Opaque, convert_author, read_author_checkpoint
from softshare.errors import SoftshareError


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
