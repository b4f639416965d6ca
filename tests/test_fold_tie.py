"""tie(): one weight and per-layer scales for agreeing layers of any model with banks; export of
shared, tied, folded and unshared nets in eval mode (the custom autograd function out of the way)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import softshare
from helpers import BODY, collinear_net, plain_net, resnet18, shared_swrn
from softshare import (SharedConv2d, SoftshareError, TemplateBank, create_model, layer_similarity, named_banks,
                       share, tie, unshare)
from softshare.layers import fast_mix


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_tie_groups_collinear_layers_exactly():
    model = collinear_net()
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    result = tie(model, 1.0)
    assert result.model is model
    assert [g.layers for g in result.groups] == [BODY[:3], BODY[3:5], BODY[5:]]
    assert result.groups[0].scales == pytest.approx([1, -2, 0.5]) and result.groups[0].fit_error < 1e-6
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    # two tied weights (1 template each + 1 scale per layer), one plain conv, by hand:
    d = 8 * 8 * 9
    body = (d + 3) + (d + 2) + d + 6 * 8  # + the six biases, unchanged
    rest = (8 * 3 * 9 + 8) + 6 * 16 + (8 * 5 + 5)  # stem, BatchNorms, head
    assert n_params(model) == result.params_after == body + rest
    assert result.params_before == 3 * d + 6 * 3 + 6 * 8 + rest
    assert type(model.get_submodule(BODY[5])) is nn.Conv2d
    assert model.get_submodule(BODY[0]).bank is model.get_submodule(BODY[2]).bank
    assert [lsm.layers for lsm in layer_similarity(model)] == [BODY[:3], BODY[3:5]]  # banks still read


def test_tie_threshold_below_one_projects_and_reports_the_misfit():
    model = collinear_net()
    with torch.no_grad():
        model.get_submodule(BODY[1]).coefficients.add_(torch.tensor([0.0, 0.01, 0.0]))
    assert len(tie(copy.deepcopy(model), 1.0).groups) == 4  # no longer exactly collinear
    result = tie(model, 0.999)
    assert [len(g.layers) for g in result.groups] == [3, 2, 1]
    assert 0 < result.groups[0].fit_error < 0.01 and result.groups[0].min_similarity < 1


def _set(model: nn.Module, vectors: dict[str, list[float]]) -> None:
    with torch.no_grad():
        for name, vector in vectors.items():
            model.get_submodule(name).coefficients.copy_(torch.tensor(vector))


def test_tie_never_grows_a_resnet18_shared_at_k2():
    """The 4 banks of ResNet-18 at k=2 (layer1: 4 convs of 64x64x3x3; layer2-4: 3 convs each),
    coefficients set so that each bank meets one case; parameters counted by hand."""
    model = share(resnet18(), 2).eval()
    assert n_params(model) == 8_519_234
    d3, d4 = 256 * 256 * 9, 512 * 512 * 9
    cos60 = [0.5, 0.75 ** 0.5]
    _set(model, {
        # layer1: one agreeing pair and two loners: tying would cost D + 2 + 2D (loners plain) > 2D + 8
        "layer1.0.conv1": [1.0, 0.0], "layer1.1.conv1": [-3.0, 0.0], "layer1.0.conv2": [0.0, 1.0],
        "layer1.1.conv2": cos60,
        # layer2: no two agree (|cos| = 0.5 pairwise)
        "layer2.0.conv2": [1.0, 0.0], "layer2.1.conv1": cos60, "layer2.1.conv2": [-0.5, 0.75 ** 0.5],
        # layer3: all three collinear: one weight and three scales
        "layer3.0.conv2": [0.6, 0.8], "layer3.1.conv1": [1.2, 1.6], "layer3.1.conv2": [-0.3, -0.4],
        # layer4: a pair tied; the loner keeps its exact weight as a plain conv (smaller than a 2-template bank)
        "layer4.0.conv2": [1.0, 0.0], "layer4.1.conv1": [0.0, 2.0], "layer4.1.conv2": [0.0, -1.0]})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    result = tie(model, 0.99)
    assert result.params_before == 8_519_234
    assert result.params_after == n_params(model) == 8_519_234 - (2 * d3 + 6 - (d3 + 3)) - (2 * d4 + 6 - (d4 + 2 + d4))
    assert [(b.bank.split(".")[0], b.tied) for b in result.banks] == [
        ("layer1", False), ("layer2", False), ("layer3", True), ("layer4", True)]
    assert "would add" in result.banks[0].reason and "no two layers agree" in result.banks[1].reason
    assert [(g.layers, g.outcome) for g in result.groups if g.bank.startswith(("layer3", "layer4"))] == [
        (["layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2"], "tied"),
        (["layer4.0.conv2"], "plain"), (["layer4.1.conv1", "layer4.1.conv2"], "tied")]
    assert result.groups[-1].scales == pytest.approx([2.0, -1.0])
    assert type(model.layer4[0].conv2) is nn.Conv2d
    assert model.layer1[0].conv1.bank.num_templates == 2 and len(model.layer1[0].conv1.bank.layers) == 4
    assert model.layer3[1].conv1.bank.num_templates == 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    assert "0 become plain" not in result.summary() and "kept  layer1" in result.summary()


def test_tie_allow_growth_ties_every_agreeing_group():
    model = share(resnet18(), 2).eval()
    _set(model, {"layer1.0.conv1": [1.0, 0.0], "layer1.1.conv1": [-3.0, 0.0], "layer1.0.conv2": [0.0, 1.0],
                 "layer1.1.conv2": [0.5, 0.75 ** 0.5]})
    d1 = 64 * 64 * 9
    result = tie(model, 0.99, allow_growth=True)
    bank = result.banks[0]
    assert bank.tied and bank.params_after - bank.params_before == (d1 + 2 + 2 * d1) - (2 * d1 + 8)
    assert result.params_after == n_params(model) > result.params_before


def test_tie_errors():
    with pytest.raises(SoftshareError, match="no template banks"):
        tie(plain_net(), 0.9)
    with pytest.raises(SoftshareError, match=r"\(0, 1\]"):
        tie(collinear_net(), 1.5)


def test_banks_a_model_holds_itself_go_when_unused():
    model = shared_swrn()
    assert all(stage.bank is not None for stage in model.stages)
    unshare(model)
    assert all(stage.bank is None for stage in model.stages)
    assert n_params(model) == n_params(create_model("wrn_16_1", num_classes=4))
    tied = tie(shared_swrn(), 0.5)
    assert tied.params_after == n_params(tied.model)
    assert all(not isinstance(m, TemplateBank) or m.layers for m in tied.model.modules())


# -- export -------------------------------------------------------------------------------------


def _folded_swrn():
    model = shared_swrn()
    for _, _, users in named_banks(model):  # make every bank's layers collinear so folding loops
        with torch.no_grad():
            for _, layer in users:
                layer.coefficients.copy_(users[0][1].coefficients)
    return softshare.fold_model(model, 0.99).model.eval()


EXPORTABLE = {
    "shared": shared_swrn,
    "tied": lambda: tie(shared_swrn(), 0.5).model,
    "folded": _folded_swrn,
    "unshared": lambda: unshare(shared_swrn()),
    "foreign shared": lambda: collinear_net(),
}


@pytest.mark.parametrize("kind", list(EXPORTABLE))
def test_eval_mode_exports_with_gradients_on(kind):
    model = EXPORTABLE[kind]()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
    assert torch.is_grad_enabled()
    traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x + 1), model(x + 1), rtol=1e-5, atol=1e-5)  # not baked constants
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), expected, rtol=1e-5, atol=1e-5)
    onnx = pytest.importorskip("onnx")
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False)
    graph = onnx.load_from_string(buffer.getvalue()).graph
    assert any(node.op_type == "Conv" for node in graph.node)


@pytest.mark.parametrize("kind", ["shared", "tied", "foreign shared"])
def test_scripting_a_shared_net_says_to_unshare_it(kind):
    with pytest.raises(SoftshareError, match=r"^torch.jit.script cannot compile soft-shared layers.*unshare\(model\)") as info:
        torch.jit.script(EXPORTABLE[kind]())
    assert "\n" not in str(info.value)


def test_unshared_net_scripts():
    model = unshare(shared_swrn())
    x = torch.randn(2, 3, 12, 12)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)


def test_training_mode_uses_the_fast_path_with_plain_autograd_gradients(monkeypatch):
    """In training the bank-wide fused mix runs (counted), and its gradients for every parameter
    equal plain autograd's through the same model (torch.func takes the plain path)."""
    model = shared_swrn().train()
    x = torch.randn(2, 3, 12, 12)
    calls = []
    original = fast_mix._MixAll.apply
    monkeypatch.setattr(fast_mix._MixAll, "apply", lambda *args: calls.append(1) or original(*args))
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # BN statistics as the step found them
    model(x).sum().backward()
    assert calls  # the custom backward was used
    fused = {name: p.grad.clone() for name, p in model.named_parameters()}
    params = {name: p.detach() for name, p in model.named_parameters()}
    plain = torch.func.grad(lambda ps, bs: torch.func.functional_call(model, {**ps, **bs}, (x,)).sum())(params, buffers)
    assert fused.keys() == plain.keys()
    for name in fused:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
    shared = [name for name in fused if name.endswith(("coefficients", "templates"))]
    assert shared and all(fused[name].abs().sum() > 0 for name in shared)  # the comparison is not of zeros
