"""softshare.analysis: |cos| and the Layer Similarity Matrix, the recurrence penalty, LSM figures and
their history during training."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from helpers import _make_collinear
from softshare import (
    SharedConv2d,
    SharedLinear,
    SoftshareError,
    TemplateBank,
    create_model,
    layer_similarity,
    recurrence_penalty,
    share,
)
from softshare.analysis import LayerSimilarity
from softshare.analysis.lsm import (
    plot_lsm,
    plot_lsm_history,
    read_lsm_history,
    record_lsm,
    save_lsm,
    short_layer_names,
)


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


@pytest.mark.slow  # end-to-end (trains, or runs the CLI in a subprocess): make test-slow
def test_history_records_epochs_and_forgets_re_trained_ones(model, tmp_path):
    for epoch in (0, 2, 4):
        record_lsm(model, tmp_path, epoch)
    paths = record_lsm(model, tmp_path, 2)  # resumed from epoch 1: epoch 4 is trained again later
    assert [r["epoch"] for r in read_lsm_history(tmp_path)] == [0, 2]
    assert (tmp_path / "lsm" / "epoch_0002" / "lsm_stages.0.bank.png") in paths
    assert (tmp_path / "lsm" / "history.png").exists()


def test_history_figure_caps_the_columns(tmp_path):
    from softshare.analysis.lsm import _spread

    assert _spread(5, 8) == [0, 1, 2, 3, 4]
    assert _spread(100, 8) == [0, 14, 28, 42, 57, 71, 85, 99]
    with pytest.raises(SoftshareError, match="no LSM history"):
        plot_lsm_history(tmp_path)


# -- layer similarity -----------------------------------------------------------------------
def test_layer_similarity_on_hand_set_coefficients():
    bank, other = TemplateBank(3, (2, 2)), TemplateBank(2, (2, 2))
    vectors = OrderedDict(first=[1.0, 0.0, 0.0], second=[0.0, 2.0, 0.0], third=[1.0, 1.0, 0.0],
                          fourth=[-3.0, 0.0, 0.0], zero=[0.0, 0.0, 0.0])
    layers = OrderedDict((name, SharedLinear(bank)) for name in vectors)
    layers["x"] = SharedLinear(other)
    layers["y"] = SharedLinear(other)
    with torch.no_grad():
        for name, v in vectors.items():
            layers[name].coefficients.copy_(torch.tensor(v))
        layers["x"].coefficients.copy_(torch.tensor([3.0, 4.0]))
        layers["y"].coefficients.copy_(torch.tensor([4.0, -3.0]))
    model = nn.Sequential(layers)
    result = layer_similarity(model)
    assert [r.bank for r in result] == ["first.bank", "x.bank"]
    assert result[0].layers == list(vectors) and result[1].layers == ["x", "y"]
    h = 1 / math.sqrt(2)
    expected = torch.tensor([
        [1, 0, h, 1, 0],
        [0, 1, h, 0, 0],
        [h, h, 1, h, 0],
        [1, 0, h, 1, 0],  # |cos| ignores the sign
        [0, 0, 0, 0, 0],  # a zero vector scores 0, even with itself
    ], dtype=torch.float64)
    assert result[0].matrix.dtype == torch.float64
    torch.testing.assert_close(result[0].matrix, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(result[1].matrix, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-12)
    assert result[1].to_dict() == {"bank": "x.bank", "layers": ["x", "y"], "matrix": [[1.0, 0.0], [0.0, 1.0]],
                                   "coefficients": [[3.0, 4.0], [4.0, -3.0]]}  # the vectors compared


def test_layer_similarity_of_swrn_in_forward_order():
    model = create_model("swrn_22_1_2")
    result = layer_similarity(model)
    assert [r.bank for r in result] == ["stages.0.bank", "stages.1.bank", "stages.2.bank"]
    order = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name))
             for name, m in model.named_modules() if isinstance(m, SharedConv2d)]
    model(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert [name for r in result for name in r.layers] == order
    for r in result:
        a = torch.stack([model.get_submodule(n).coefficients.detach().double() for n in r.layers])
        a = a / a.norm(dim=1, keepdim=True)
        torch.testing.assert_close(r.matrix, (a @ a.T).abs(), rtol=1e-12, atol=1e-12)


def test_penalty_is_zero_exactly_when_foldable_pairs_are_collinear():
    model = create_model("swrn_22_1_4")  # 2 shared blocks per stage: one foldable pair per role and stage
    assert recurrence_penalty(model).item() > 0.5  # orthonormal start: cos = 0 for every pair
    for stage in range(3):
        _make_collinear(model, stage, [1, 2])
    assert abs(recurrence_penalty(model).item()) < 1e-6
    penalty = recurrence_penalty(create_model("swrn_22_1_4"))
    penalty.backward()  # differentiable: it can be added to the loss


def _axes():
    from matplotlib.figure import Figure
    return Figure().add_subplot()


def test_lsm_heatmaps_name_and_number_small_banks_and_index_large_ones():
    from softshare.analysis.lsm import _draw

    small = LayerSimilarity("stages.0.bank", [f"stages.0.blocks.{i}.conv1" for i in range(4)], torch.eye(4).double())
    ax = _axes()
    _draw(ax, small)
    assert len(ax.texts) == 16 and [t.get_text() for t in ax.get_xticklabels()] == [f"b{i}.conv1" for i in range(4)]
    big = LayerSimilarity("banks.conv1", [f"blocks.{i}.conv1" for i in range(30)], torch.rand(30, 30).double())
    ax = _axes()
    _draw(ax, big)
    assert not ax.texts  # no 900 numbers in 4 pt type
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "5", "10", "15", "20", "25"]
    assert ax.get_xlabel() == "layer index (0: b0.conv1, 29: b29.conv1)"


def test_bank_labels_read_as_words():
    from softshare.analysis.lsm import bank_label

    assert bank_label("stages.2.bank", ["stages.2.blocks.1.conv1"]) == "stage 2"
    assert bank_label("banks.conv1", ["blocks.0.conv1", "blocks.1.conv1"]) == "conv1"
    assert bank_label("layer4.0.conv2.bank", ["layer4.0.conv2", "layer4.1.conv1"]) == "layer4"  # made by share()


def test_a_one_template_bank_shows_its_scales(tmp_path, monkeypatch):
    from softshare.analysis import lsm

    model = share(nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)), 1)
    (similarity,) = layer_similarity(model)
    assert similarity.scales == pytest.approx([model[i].coefficients.item() for i in range(3)])
    assert LayerSimilarity.from_dict(similarity.to_dict()).scales == similarity.scales
    figures = []
    monkeypatch.setattr(lsm, "save_figure", lambda fig, path: figures.append(fig) or path)
    lsm.plot_lsm([similarity], tmp_path)
    (ax,) = [a for a in figures[0].axes]
    assert not ax.images and ax.get_ylabel() == "scale $c_i$"  # a line of scales, not an all-ones heatmap
    assert "one template" in figures[0].get_suptitle()


def test_history_says_which_epochs_it_shows(model, tmp_path, monkeypatch):
    from softshare.analysis import lsm

    banks = [s.to_dict() for s in layer_similarity(model)]
    (tmp_path / "lsm").mkdir()
    (tmp_path / "lsm" / "history.jsonl").write_text("".join(json.dumps({"epoch": e, "banks": banks}) + "\n"
                                                            for e in range(11)))
    figures = []
    monkeypatch.setattr(lsm, "save_figure", lambda fig, path: figures.append(fig) or path)  # not rendered
    plot_lsm_history(tmp_path)
    assert "8 of 11 recorded epochs, evenly spaced" in figures[-1].get_suptitle()
    assert [ax.get_title() for ax in figures[-1].axes[:8]] == [f"epoch {e}" for e in (0, 1, 3, 4, 6, 7, 9, 10)]
    plot_lsm_history(tmp_path, max_columns=11)
    assert "all 11 recorded epochs" in figures[-1].get_suptitle()


@pytest.mark.parametrize("figure_format, magic", [("pdf", b"%PDF"), ("svg", b"<?xml"), ("png", b"\x89PNG")])
def test_lsm_figures_in_every_format(model, tmp_path, figure_format, magic):
    paths = save_lsm(model, tmp_path, figure_format=figure_format)
    figures = [p for p in paths if p.suffix != ".json"]
    assert [p.name for p in figures] == [f"lsm_stages.{i}.bank.{figure_format}" for i in range(3)]
    assert all(p.read_bytes().startswith(magic) for p in figures)
    record_lsm(model, tmp_path / "run", 0, figure_format=figure_format)
    assert (tmp_path / "run" / "lsm" / f"history.{figure_format}").read_bytes().startswith(magic)


def test_coefficient_dynamics_against_the_random_control(tmp_path):
    """Random k=2 directions: mean |cos| of neighbours is 2/pi (E|cos theta|, theta uniform), and the
    nearest of 30 others is almost 1 by chance alone (why that number proves nothing at k=2)."""
    from softshare.analysis import random_similarity
    from softshare.analysis.dynamics import bank_dynamics
    control = random_similarity(30, 2, samples=400)
    assert control["consecutive_mean"] == pytest.approx(2 / math.pi, abs=0.02)
    assert control["nearest_mean"] > 0.99
    collinear = torch.tensor([[1.0, 2.0]] * 5) * torch.tensor([[1.0], [-2.0], [0.5], [3.0], [1.0]])
    summary = bank_dynamics(collinear, start=collinear.flip(1))
    assert summary["consecutive_min"] == pytest.approx(1.0) and summary["consecutive_at_0.99"] == 1.0
    assert summary["cos_to_start_mean"] == pytest.approx(4 / 5)  # |cos((1,2), (2,1))|


def test_foldable_pairs_from_names_are_the_pairs_fold_merges():
    """Read from recorded names, the pairs must be exactly those of `block_runs` on the model: the
    same role in consecutive blocks (b1.conv1 with b2.conv1, never b1.conv1 with b1.conv2)."""
    from softshare.analysis import block_runs, foldable_pairs
    for name, kwargs in (("swrn_22_1_4", {}), ("swrn_28_1_2", {}), ("prefix_shared", dict(num_templates=2, depth=6))):
        model = create_model(name, **kwargs)
        from_model = set()
        for site in block_runs(model):
            for role in site.roles:
                names = [f"{site.container}.{site.start + b}.{role}" for b in range(len(site.blocks))]
                from_model |= set(zip(names, names[1:]))
        from_names = {(s.layers[i], s.layers[j]) for s in layer_similarity(model) for i, j in foldable_pairs(s.layers)}
        assert from_names == from_model and from_model
    assert foldable_pairs(["0.conv1", "1.conv1", "stem", "head.fc"]) == [(0, 1)]
    assert foldable_pairs(["a.1.conv1", "a.3.conv1", "b.2.conv1"]) == []  # not consecutive, other container


def test_drift_control_against_its_closed_form():
    """k = 2, every layer starting on one line and turned by theta: two layers end at angle 0 or
    2 theta from each other with probability 1/2 each, so the control's pair |cos| is
    (1 + |cos 2 theta|) / 2 on average, whatever the layers really did."""
    from softshare.analysis.dynamics import bank_dynamics
    theta = math.pi / 6
    start = torch.tensor([[1.0, 0.0]] * 6, dtype=torch.float64)
    turned = torch.tensor([[math.cos(theta), math.sin(theta)]] * 6, dtype=torch.float64)  # all the same way
    summary = bank_dynamics(turned, start, pairs=[(0, 1), (2, 3), (4, 5)], drift_samples=4000)
    assert summary["consecutive_mean"] == pytest.approx(1.0) and summary["cos_to_start_mean"] == pytest.approx(
        math.cos(theta))
    assert summary["drift_mean"] == pytest.approx((1 + abs(math.cos(2 * theta))) / 2, abs=0.02)
    assert summary["drift_at_0.99"] == pytest.approx(0.5, abs=0.03)  # the same way by chance: half the pairs
    unmoved = bank_dynamics(start, start, pairs=[(0, 1)])
    assert unmoved["drift_mean"] == pytest.approx(1.0) and unmoved["pairs"] == 1
    assert math.isnan(bank_dynamics(start, start, pairs=[])["consecutive_mean"])


def test_pairs_over_training_counts_what_folding_needs(tmp_path):
    from softshare.analysis import pairs_over_training
    model = create_model("swrn_22_1_2")
    record_lsm(model, tmp_path, 0)
    for stage in range(3):
        _make_collinear(model, stage, [1, 2])  # every foldable pair collinear, scaled -2
    record_lsm(model, tmp_path, 1)
    start, end = pairs_over_training(tmp_path)
    assert start["pairs"] == end["pairs"] == 6  # 3 stages x (conv1, conv2) of blocks 1-2
    assert end["at_0.99"] == 6 and end["mean"] == pytest.approx(1.0)
    expected = [abs(torch.nn.functional.cosine_similarity(a, b, dim=0).item())
                for record in read_lsm_history(tmp_path)[:1] for bank in record["banks"]
                for a, b in ((torch.tensor(bank["coefficients"][0]), torch.tensor(bank["coefficients"][2])),
                             (torch.tensor(bank["coefficients"][1]), torch.tensor(bank["coefficients"][3])))]
    assert start["mean"] == pytest.approx(sum(expected) / 6)
    assert start["at_0.9"] == sum(v >= 0.9 for v in expected) and start["cos_to_start"] == pytest.approx(1.0)


@pytest.mark.slow  # end-to-end (trains, or runs the CLI in a subprocess): make test-slow
def test_history_keeps_the_coefficients_for_the_dynamics(model, tmp_path):
    from softshare.analysis import coefficient_dynamics, plot_dynamics
    record_lsm(model, tmp_path, 0)
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "coefficients"):
                layer.coefficients.mul_(-3)  # same directions: nothing turned
    record_lsm(model, tmp_path, 1)
    history = coefficient_dynamics(tmp_path)
    assert [h["epoch"] for h in history] == [0, 1]
    for name, bank in history[1]["banks"].items():
        assert bank["cos_to_start_mean"] == pytest.approx(1.0)
        assert bank["norm_mean"] == pytest.approx(3 * history[0]["banks"][name]["norm_mean"])
    assert plot_dynamics(tmp_path).is_file()


def test_penalty_reach_pulls_together_layers_that_many_blocks_apart():
    """reach r: mean of 1 - cos^2 over same-role pairs 1..r blocks apart, computed here by hand on a
    5-iteration prefix-sums net whose layers turn 20 degrees per block (neighbours agree, ends do not)."""
    import math
    torch.manual_seed(0)
    model = create_model("prefix_shared", num_classes=2, in_channels=1, width=4, depth=5, blocks=1,
                         num_templates=2)
    with torch.no_grad():
        for role, bank in model.banks.items():
            for i, layer in enumerate(bank.layers):
                angle = math.radians(20 * i)
                layer.coefficients.copy_(torch.tensor([math.cos(angle), math.sin(angle)]) * (i + 1))
    roles = len(model.banks)

    def by_hand(reach: int) -> float:
        terms = [1 - math.cos(math.radians(20 * gap)) ** 2 for gap in range(1, reach + 1) for _ in range(5 - gap)]
        return sum(terms) / len(terms)  # every role alike: the mean over roles is the same

    assert roles == 3
    for reach in (1, 2, 4):
        assert recurrence_penalty(model, reach).item() == pytest.approx(by_hand(reach), rel=1e-5)
    assert recurrence_penalty(model, 9).item() == pytest.approx(by_hand(4), rel=1e-5)  # no pair is further apart
    assert recurrence_penalty(model, 2).item() > 2 * recurrence_penalty(model, 1).item()  # far pairs weigh in
    with pytest.raises(SoftshareError, match="reach"):
        recurrence_penalty(model, 0)


def test_signed_penalty_tells_a_layer_from_its_negative():
    """The default 1 - cos^2 counts W and -W as one layer (as the LSM does); signed takes 1 - cos:
    0 for the same direction, 2 for the opposite one, 1 - cos(60 deg) = 0.5 in between."""
    torch.manual_seed(0)
    model = create_model("prefix_shared", num_classes=2, in_channels=1, width=4, depth=3, blocks=1,
                         num_templates=2)
    with torch.no_grad():
        for bank in model.banks.values():
            for layer, vector in zip(bank.layers, ([1.0, 0.0], [-2.0, 0.0], [-1.0, -(3 ** 0.5)])):
                layer.coefficients.copy_(torch.tensor(vector))
    # consecutive pairs: (v, -2v): cos -1; (-2v, 60 deg from -v): cos 0.5
    assert recurrence_penalty(model).item() == pytest.approx((0 + 0.75) / 2, abs=1e-6)
    assert recurrence_penalty(model, signed=True).item() == pytest.approx((2 + 0.5) / 2, abs=1e-6)
