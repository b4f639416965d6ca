"""Layer Similarity Matrix figures and their history during training (softshare.lsm)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from softshare import SoftshareError, create_model, layer_similarity, share
from softshare.cli import main
from softshare.lsm import (
    plot_lsm,
    plot_lsm_history,
    read_lsm_history,
    record_lsm,
    save_lsm,
    short_layer_names,
)
from softshare.similarity import LayerSimilarity


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("swrn_22_1_2")  # 2 shared blocks per stage: 4 layers per bank


def test_short_layer_names():
    names = ["stages.0.blocks.1.conv1", "stages.0.blocks.1.conv2", "stages.0.blocks.2.conv1"]
    assert short_layer_names(names) == ["b1.conv1", "b1.conv2", "b2.conv1"]
    assert short_layer_names(["layer1.0.conv1", "layer2.1.conv2"]) == ["layer1.0.conv1", "layer2.1.conv2"]
    assert short_layer_names(["blocks.1.conv", "bodies.1.conv"]) == ["blocks.1.conv", "bodies.1.conv"]
    assert short_layer_names(["net.blocks.3.conv1"]) == ["conv1"]


def test_save_lsm_writes_one_figure_per_bank_and_the_matrices(model, tmp_path):
    paths = save_lsm(model, tmp_path)
    assert sorted(p.name for p in paths) == ["lsm.json", "lsm_stages.0.bank.png", "lsm_stages.1.bank.png",
                                             "lsm_stages.2.bank.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    banks = json.loads((tmp_path / "lsm.json").read_text())["banks"]
    expected = layer_similarity(model)
    assert [b["layers"] for b in banks] == [s.layers for s in expected]
    assert torch.allclose(torch.tensor(banks[1]["matrix"], dtype=torch.float64), expected[1].matrix)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_lsm_of_a_converted_model(tmp_path):
    converted = share(nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)), 2)
    assert [p.name for p in save_lsm(converted, tmp_path)] == ["lsm_0.bank.png", "lsm.json"]


def test_large_banks_drop_annotations(tmp_path):
    similarity = LayerSimilarity("big", [f"blocks.{i}.conv" for i in range(40)], torch.rand(40, 40).double())
    (path,) = plot_lsm([similarity], tmp_path)
    assert path.name == "lsm_big.png" and path.stat().st_size > 0


def test_model_without_banks():
    with pytest.raises(SoftshareError, match="no template banks"):
        save_lsm(create_model("wrn_16_1"), "unused")


def test_history_records_epochs_and_forgets_re_trained_ones(model, tmp_path):
    for epoch in (0, 2, 4):
        record_lsm(model, tmp_path, epoch)
    paths = record_lsm(model, tmp_path, 2)  # resumed from epoch 1: epoch 4 is trained again later
    assert [r["epoch"] for r in read_lsm_history(tmp_path)] == [0, 2]
    assert (tmp_path / "lsm" / "epoch_0002" / "lsm_stages.0.bank.png") in paths
    assert (tmp_path / "lsm" / "history.png").exists()


def test_history_figure_caps_the_columns(tmp_path):
    from softshare.lsm import _spread

    assert _spread(5, 8) == [0, 1, 2, 3, 4]
    assert _spread(100, 8) == [0, 14, 28, 42, 57, 71, 85, 99]
    with pytest.raises(SoftshareError, match="no LSM history"):
        plot_lsm_history(tmp_path)


def test_cli_lsm_on_a_run_and_a_checkpoint(model, tmp_path, capsys):
    from softshare.checkpoint import save_checkpoint

    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "last", model)
    record_lsm(model, run, 0)
    assert main(["lsm", str(run)]) == 0
    assert (run / "lsm" / "lsm_stages.2.bank.png").exists() and (run / "lsm" / "history.png").exists()
    assert "b1.conv1" in capsys.readouterr().out
    assert main(["lsm", str(run / "checkpoints" / "last")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["lsm", str(run / "checkpoints" / "last"), "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "lsm.json").exists()
