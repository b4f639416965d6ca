"""tie(), unshare(), export of shared/tied/folded/unshared nets, and checkpoints of foreign models."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import softshare
from softshare import (
    SharedConv2d,
    SharedLayer,
    SoftshareError,
    TemplateBank,
    create_model,
    layer_similarity,
    load,
    load_into,
    named_banks,
    save_checkpoint,
    share,
    tie,
    unshare,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def plain_net() -> nn.Module:
    """A foreign net: 6 convs of one shape (with biases) and a head."""
    torch.manual_seed(0)
    body = [nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()) for _ in range(6)]
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


BODY = [f"{i}.0" for i in range(1, 7)]


def collinear_net() -> nn.Module:
    """plain_net shared with k=3, coefficients set so that body convs 1-3 are collinear
    (scales 1, -2, 0.5 of one direction), 4-5 collinear (3, 1 of another), 6 alone."""
    model = share(plain_net(), 3)
    u = torch.tensor([1.0, 2.0, 2.0]) / 3
    v = torch.tensor([2.0, -1.0, 2.0]) / 3
    w = torch.tensor([0.3, 0.1, -0.2])
    with torch.no_grad():
        for name, vector in zip(BODY, [u, -2 * u, 0.5 * u, 3 * v, v, w]):
            model.get_submodule(name).coefficients.copy_(vector)
    return model.eval()


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


def test_tie_errors():
    with pytest.raises(SoftshareError, match="no template banks"):
        tie(plain_net(), 0.9)
    with pytest.raises(SoftshareError, match=r"\(0, 1\]"):
        tie(collinear_net(), 1.5)


def test_unshare_restores_plain_layers_with_identical_outputs():
    original = plain_net()
    model = share(copy.deepcopy(original), 2).eval()
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    assert unshare(model) is model
    assert not any(isinstance(m, (SharedLayer, TemplateBank)) for m in model.modules())
    assert [type(model.get_submodule(n)) for n in BODY] == [nn.Conv2d] * 6
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
    assert n_params(model) == n_params(original)
    # what Hugging Face save_pretrained refuses: tensors shared between keys
    with pytest.raises(RuntimeError, match="share memory"):
        save_file(share(plain_net(), 2).state_dict(), "/dev/null")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, "/dev/null")


def test_unshare_keeps_training_state_and_trains():
    model = share(plain_net(), 2)
    unshare(model)
    assert model.training and all(p.requires_grad for p in model.parameters())
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# -- export -------------------------------------------------------------------------------------
def _shared_swrn():
    torch.manual_seed(0)
    return create_model("swrn_16_1_2", num_classes=4).eval()


def _folded_swrn():
    model = _shared_swrn()
    for _, _, users in named_banks(model):  # make every bank's layers collinear so folding loops
        with torch.no_grad():
            for _, layer in users:
                layer.coefficients.copy_(users[0][1].coefficients)
    return softshare.fold_model(model, 0.99).model.eval()


EXPORTABLE = {
    "shared": _shared_swrn,
    "tied": lambda: tie(_shared_swrn(), 0.5).model,
    "folded": _folded_swrn,
    "unshared": lambda: unshare(_shared_swrn()),
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


def test_unshared_net_scripts():
    model = unshare(_shared_swrn())
    x = torch.randn(2, 3, 12, 12)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)


def test_training_mode_still_uses_the_fast_path():
    model = _shared_swrn().train()
    model(torch.randn(2, 3, 12, 12)).sum().backward()  # the bank-wide custom backward
    layer = next(m for m in model.modules() if isinstance(m, SharedConv2d))
    assert layer.coefficients.grad is not None and layer.bank.templates.grad is not None


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
    assert n_params(fresh) == n_params(model)
    torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=0)


def test_tied_and_unshared_checkpoints_rebuild_their_structure(tmp_path):
    x = torch.randn(2, 3, 12, 12)
    tied = tie(_shared_swrn(), 0.5).model
    save_checkpoint(tmp_path / "tied", tied)
    torch.testing.assert_close(load(tmp_path / "tied")(x), tied(x), rtol=0, atol=0)
    plain = unshare(_shared_swrn())
    save_checkpoint(tmp_path / "plain", plain)
    loaded = load(tmp_path / "plain")
    assert not named_banks(loaded)
    torch.testing.assert_close(loaded(x), plain(x), rtol=0, atol=0)


def test_pretrained_is_one_clear_error():
    with pytest.raises(SoftshareError, match="no pretrained weights"):
        create_model("swrn_16_1_2", pretrained=True)
    assert create_model("swrn_16_1_2", pretrained=False).softshare_config["name"] == "swrn_16_1_2"


def test_banks_a_model_holds_itself_go_when_unused():
    model = _shared_swrn()
    assert all(stage.bank is not None for stage in model.stages)
    unshare(model)
    assert all(stage.bank is None for stage in model.stages)
    assert n_params(model) == n_params(create_model("wrn_16_1", num_classes=4))
    tied = tie(_shared_swrn(), 0.5)
    assert tied.params_after == n_params(tied.model)
    assert all(not isinstance(m, TemplateBank) or m.layers for m in tied.model.modules())
