"""Checkpoint directories: round trips, unique storage, atomicity, and every bad-input error."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from helpers import exact_kernels, on
import softshare
from helpers import plain_net, shared_swrn
from softshare import named_banks, share, tie, unshare
from softshare.checkpoint import (
    Checkpoint,
    find_checkpoint,
    load,
    load_checkpoint,
    load_into,
    save_checkpoint,
)
from softshare.errors import SoftshareError
from softshare.models import create_model
from safetensors.torch import load_file, save_file

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _model(name: str = "swrn_16_1_2", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = softshare.create_model(name, **kwargs)
    with torch.no_grad():  # non-trivial BN statistics, so eval outputs depend on them
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = _model()
    return model, save_checkpoint(tmp_path_factory.mktemp("ck") / "ck", model, epoch=3, metrics={"acc": 0.5})


@pytest.mark.parametrize("name", ["swrn_16_1_2", "wrn_10_2"])
def test_round_trip_same_outputs(tmp_path, name):
    model = _model(name, num_classes=7)
    loaded = load(save_checkpoint(tmp_path / "ck", model))
    assert not loaded.training and loaded.softshare_config == model.softshare_config
    assert torch.equal(loaded(X), model(X))


def test_round_trip_channels_last_is_bitwise_on_device(tmp_path, device):
    model = softshare.to_channels_last(_model().to(device))
    path = save_checkpoint(tmp_path / "ck", model)
    loaded = softshare.to_channels_last(load(path, device=device))
    assert all(p.device.type == device.type for p in loaded.parameters())
    x = on(device, X, channels_last=True)
    with exact_kernels(device), torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        target = softshare.to_channels_last(softshare.create_model("swrn_16_1_2").eval().to(device))
        load_into(target, path)
        assert torch.equal(target(x), model(x))


def test_meta_and_paths(saved, tmp_path):
    model, path = saved
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == "softshare-checkpoint" and meta["version"] == 1
    assert meta["model"] == model.softshare_config and meta["epoch"] == 3 and meta["metrics"] == {"acc": 0.5}
    assert meta["aliases"]["stages.0.blocks.1.conv1.bank.templates"] == "stages.0.bank.templates"
    assert find_checkpoint(path / "model.safetensors") == path
    run = tmp_path / "run"
    last = save_checkpoint(run / "checkpoints" / "last", model)
    assert find_checkpoint(run) == last
    best = save_checkpoint(run / "checkpoints" / "best", model)
    assert find_checkpoint(run) == best
    assert torch.equal(load(run)(X), model(X))


def test_each_tensor_stored_once(saved):
    model, path = saved
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.state_dict().values()}
    listed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size = (path / "model.safetensors").stat().st_size
    assert sum(unique.values()) < size < sum(unique.values()) + 32_000 < listed
    ckpt = load_checkpoint(path)
    assert ckpt.state_dict.keys() == model.state_dict().keys()
    assert ckpt.state_dict["stages.2.blocks.1.conv2.bank.templates"] is ckpt.state_dict["stages.2.bank.templates"]


def test_overlapping_views_round_trip(tmp_path):
    def with_view(seed):
        torch.manual_seed(seed)
        model = softshare.create_model("swrn_16_1_2").eval()
        model.register_buffer("first_row", model.fc.weight.detach()[0])  # overlaps fc.weight's memory
        return model

    model, target = with_view(0), with_view(1)
    assert not torch.equal(target.first_row, model.first_row)
    load_into(target, save_checkpoint(tmp_path / "ck", model))
    assert torch.equal(target.first_row, model.fc.weight[0]) and torch.equal(target(X), model(X))


def test_train_state_loads_weights_only(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    model(X).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1, 2])
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "rng": {"torch": torch.get_rng_state()}, "loader": {"epoch": 1, "batch": 5}}
    path = save_checkpoint(tmp_path / "ck", model, step=5, train_state=state)
    raw = torch.load(path / "state.pt", weights_only=True)
    assert raw["loader"] == {"epoch": 1, "batch": 5}
    ckpt = load_into(_model(), path)
    assert isinstance(ckpt, Checkpoint) and ckpt.meta["step"] == 5
    assert torch.equal(ckpt.train_state["rng"]["torch"], state["rng"]["torch"])
    torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).load_state_dict(ckpt.train_state["optimizer"])


def test_train_state_must_be_weights_only(tmp_path):
    import numpy as np

    with pytest.raises(SoftshareError, match=r"cannot be read back.*pickles numpy.*_reconstruct.*as tensors"):
        save_checkpoint(tmp_path / "ck", _model(), train_state={"rng": {"numpy": np.zeros(3)}})
    assert not (tmp_path / "ck").exists()


def test_failure_mid_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    model = _model()
    path = save_checkpoint(tmp_path / "ck", model, epoch=1)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def broken_save(tensors, filename):
        filename.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("softshare.checkpoint.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ck", model, epoch=2)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "new", model)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_foreign_model_saves_and_load_names_load_into(tmp_path):
    save_checkpoint(tmp_path / "foreign", nn.Linear(2, 2))
    meta = json.loads((tmp_path / "foreign" / "meta.json").read_text())
    assert meta["model"] == {"name": None, "class": "torch.nn.modules.linear.Linear"} and meta["banks"] == []
    with pytest.raises(SoftshareError, match=r"cannot rebuild by name.*softshare.load_into\(model"):
        load(tmp_path / "foreign")


def test_save_errors(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.txt").write_text("keep me")
    with pytest.raises(SoftshareError, match="refusing to replace"):
        save_checkpoint(tmp_path / "run", _model())
    with pytest.raises(SoftshareError, match="not JSON"):
        save_checkpoint(tmp_path / "ck", _model(), metrics={"when": object()})
    assert (tmp_path / "run" / "log.txt").read_text() == "keep me" and not (tmp_path / "ck").exists()


def _copy(saved, tmp_path):
    import shutil

    return shutil.copytree(saved[1], tmp_path / "copy")


def _edit_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("breakage, message", [
    (lambda p: (p / "meta.json").unlink(), "has no meta.json"),
    (lambda p: (p / "meta.json").write_text("{not json"), "not valid JSON"),
    (lambda p: _edit_meta(p, format="something-else"), "not a softshare checkpoint"),
    (lambda p: _edit_meta(p, version=2), "version 2, newer.*upgrade softshare"),
    (lambda p: _edit_meta(p, model={"name": "resnet_9000"}), "cannot rebuild.*unknown model 'resnet_9000'"),
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:5000]),
     "model.safetensors is truncated or corrupt"),
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-1000]),
     "model.safetensors is truncated or corrupt"),
    (lambda p: (p / "model.safetensors").unlink(), "has no model.safetensors"),
])
def test_bad_checkpoint_errors(saved, tmp_path, breakage, message):
    path = _copy(saved, tmp_path)
    breakage(path)
    with pytest.raises(SoftshareError, match=message) as info:
        load(path)
    assert str(path) in str(info.value)


def test_corrupt_train_state(saved, tmp_path):
    path = _copy(saved, tmp_path)
    (path / "state.pt").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(SoftshareError, match="state.pt is truncated or corrupt.*delete it"):
        load_checkpoint(path)
    assert not load(path).training  # the model alone does not need state.pt


def test_bad_path_errors(tmp_path):
    with pytest.raises(SoftshareError, match="does not exist; pass a run directory"):
        load(tmp_path / "missing")
    with pytest.raises(SoftshareError, match="holds no checkpoint"):
        load(tmp_path)
    (tmp_path / "ref.pth.tar").write_bytes(b"x")
    with pytest.raises(SoftshareError, match="convert-author"):
        load(tmp_path / "ref.pth.tar")


def test_other_architecture_lists_mismatches(saved):
    _, path = saved
    with pytest.raises(SoftshareError, match=r"\(swrn_16_1_2\) does not fit this model \(wrn_16_1\): "
                                             r"\d+ missing keys .*unexpected keys"):
        load_into(softshare.create_model("wrn_16_1"), path)
    with pytest.raises(SoftshareError, match=r"mismatches \(.*fc.weight: checkpoint \(10, 64\) vs model \(5, 64\)"):
        load_into(softshare.create_model("swrn_16_1_2", num_classes=5), path)


# -- checkpoints of foreign models --------------------------------------------------------------
def test_foreign_checkpoint_loads_into_a_freshly_built_plain_model(tmp_path):
    model = share(plain_net(), 2).eval()
    x = torch.randn(2, 3, 6, 6)
    save_checkpoint(tmp_path / "ck", model)
    with pytest.raises(SoftshareError, match=r"load_into\(model"):
        load(tmp_path / "ck")
    fresh = plain_net()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1)  # whatever the fresh model holds is replaced
    load_into(fresh, tmp_path / "ck")
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=0)


def test_tied_and_unshared_checkpoints_rebuild_their_structure(tmp_path):
    x = torch.randn(2, 3, 12, 12)
    tied = tie(shared_swrn(), 0.5).model
    save_checkpoint(tmp_path / "tied", tied)
    torch.testing.assert_close(load(tmp_path / "tied")(x), tied(x), rtol=0, atol=0)
    plain = unshare(shared_swrn())
    save_checkpoint(tmp_path / "plain", plain)
    loaded = load(tmp_path / "plain")
    assert not named_banks(loaded)
    torch.testing.assert_close(loaded(x), plain(x), rtol=0, atol=0)


def test_a_checkpoint_from_before_a_family_renamed_its_modules_still_loads(tmp_path):
    """AlgorithmicNet's iterations were `blocks` (ambiguous with residual blocks per iteration): a
    checkpoint with the old keys, aliases and bank layer names loads, and tie()/unshare() banks too."""
    torch.manual_seed(0)
    model = create_model("prefix_shared", in_channels=1, width=4, depth=3, blocks=1, num_templates=2).eval()
    path = save_checkpoint(tmp_path / "new", model)
    old = tmp_path / "old"
    old.mkdir()
    tensors = load_file(path / "model.safetensors")
    assert any(key.startswith("iterations.") for key in tensors)
    save_file({key.replace("iterations.", "blocks."): value for key, value in tensors.items()},
              old / "model.safetensors")
    meta = json.loads((path / "meta.json").read_text().replace('"iterations.', '"blocks.'))
    assert any(layer.startswith("blocks.") for bank in meta["banks"] for layer in bank["layers"])
    (old / "meta.json").write_text(json.dumps(meta))
    loaded = load(old)
    x = torch.rand(2, 1, 8)
    assert torch.equal(loaded(x), model(x))
    assert all(not key.startswith("blocks.") for key in load_checkpoint(old).state_dict)
