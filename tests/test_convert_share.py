"""share() on a foreign CNN, layer_similarity and param_groups, against hand computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from helpers import foreign
from softshare import (
    SharedConv1d,
    SharedConv2d,
    SharedLayer,
    SharedLinear,
    SoftshareError,
    TemplateBank,
    create_model,
    layer_similarity,
    named_banks,
    param_groups,
    share,
)


ORIGINAL_PARAMS = 216 + 576 + 576 + 576 + 8 + 1152 + 256 + 768 + 170
CONVS = ["stem", "block1.0", "block1.2", "block2.0", "block2.2", "mix", "seq"]


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def shared_names(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, SharedLayer)]


def test_foreign_model_parameter_count():
    assert n_params(foreign()) == ORIGINAL_PARAMS


def test_default_shares_only_groups_that_get_smaller():
    # k=2: only the three (8, 8, 3, 3) convs are more layers of one shape than templates
    model = share(foreign(), 2)
    assert shared_names(model) == ["block1.0", "block1.2", "block2.0"]
    assert n_params(model) == ORIGINAL_PARAMS - 3 * 576 + (2 * 576 + 3 * 2) == 3728
    assert type(model.stem) is nn.Conv2d and type(model.seq) is nn.Conv1d
    plan = model.softshare_share_plan
    assert (plan.params_before, plan.params_after) == (ORIGINAL_PARAMS, 3728)
    assert [(g.weight_shape, len(g.layers), g.shared) for g in plan.groups] == [
        ((8, 3, 3, 3), 1, False), ((8, 8, 3, 3), 3, True), ((16, 8, 3, 3), 1, False),
        ((16, 16, 1, 1), 1, False), ((16, 16, 3), 1, False)]


def test_dry_run_changes_nothing_and_predicts_the_count():
    model = foreign()
    before = copy.deepcopy(model.state_dict())
    plan = share(model, 2, dry_run=True)
    assert shared_names(model) == [] and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert plan.params_after == n_params(share(foreign(), 2)) == 3728
    assert "1 of 5 groups" in plan.summary() and "+" not in plan.summary().splitlines()[0].split("(")[-1]


def test_no_group_that_saves_is_an_error_naming_the_fix():
    model = foreign()
    with pytest.raises(SoftshareError, match="allow_growth=True"):
        share(model, 3)  # the largest group has 3 layers: a bank of 3 templates saves nothing
    assert shared_names(model) == []


def test_allow_growth_shares_every_conv_one_bank_per_shape():
    model = share(foreign(), 2, allow_growth=True)
    assert shared_names(model) == CONVS
    assert type(model.seq) is SharedConv1d and type(model.block1[0]) is SharedConv2d
    assert type(model.fc) is nn.Linear
    banks = {name: (bank.weight_shape, [n for n, _ in users]) for name, bank, users in named_banks(model)}
    assert sorted(banks.values()) == sorted([
        ((8, 3, 3, 3), ["stem"]),
        ((8, 8, 3, 3), ["block1.0", "block1.2", "block2.0"]),
        ((16, 8, 3, 3), ["block2.2"]),
        ((16, 16, 1, 1), ["mix"]),
        ((16, 16, 3), ["seq"]),
    ])
    k = 2
    expected = (
        (k * 216 + 1 * k)  # stem bank + coefficients
        + (k * 576 + 3 * k)  # the three 8->8 3x3 convs
        + (k * 1152 + k) + (k * 256 + k) + (k * 768 + k)
        + 8  # block2.0 keeps its bias
        + 170  # fc untouched
    )
    assert n_params(model) == expected == 6128
    # configurations carried over
    assert model.block1[2].dilation == (2, 2) and model.block1[2].padding_mode == "reflect"
    assert model.block2[0].padding == "same" and model.block2[2].stride == (2, 2)
    assert model.seq.padding_mode == "circular"
    assert model.block2[0].bias is not None and model.block1[0].bias is None


def test_share_converts_in_place_keeps_dtype_and_trains():
    original = foreign()
    model = share(original, 2)
    assert model is original
    assert all(p.dtype == torch.float64 for p in model.parameters())
    out = model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    out.square().sum().backward()
    for name, bank, users in named_banks(model):
        assert bank.templates.grad is not None and bank.templates.grad.abs().sum() > 0, name
        assert all(layer.coefficients.grad is not None for _, layer in users)


def test_glob_pattern_selection():
    model = share(foreign(), 1, select="block1.*")
    assert shared_names(model) == ["block1.0", "block1.2"]
    assert model.block1[0].bank is model.block1[2].bank
    assert type(model.block2[0]) is nn.Conv2d
    assert n_params(model) == ORIGINAL_PARAMS - 2 * 576 + 576 + 2 * 1

    model = share(foreign(), 2, select=["stem", "fc"], allow_growth=True)  # several patterns; Linear only when selected
    assert shared_names(model) == ["stem", "fc"]
    assert type(model.fc) is SharedLinear and model.fc.bank is not model.stem.bank
    assert n_params(model) == ORIGINAL_PARAMS - 216 - 160 + (2 * 216 + 2) + (2 * 160 + 2)


def test_predicate_selection():
    def square_3x3(name, m):
        return isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.in_channels == m.out_channels

    model = share(foreign(), 2, select=square_3x3)
    assert shared_names(model) == ["block1.0", "block1.2", "block2.0"]
    assert len(named_banks(model)) == 1


def test_explicit_group_splits_banks_of_one_shape():
    model = share(foreign(), 2, group=lambda name, m: name.split(".")[0], allow_growth=True)
    assert model.block1[0].bank is model.block1[2].bank
    assert model.block2[0].bank is not model.block1[0].bank
    assert len(named_banks(model)) == 6
    assert n_params(model) == 6128 + 2 * 576 + 0  # one more (8, 8, 3, 3) bank; same coefficients


def test_init_from_weights_with_k_at_least_group_size_keeps_outputs():
    original = foreign()
    weights = {name: original.get_submodule(name).weight.detach().clone() for name in CONVS}
    model = share(copy.deepcopy(original), 3, init_from_weights=True, allow_growth=True)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x), original(x), rtol=1e-12, atol=1e-12)
    for name, bank, users in named_banks(model):
        for j, (layer_name, layer) in enumerate(users):  # one template per layer, one-hot coefficients
            torch.testing.assert_close(bank.templates[j], weights[layer_name], rtol=0, atol=0)
            torch.testing.assert_close(layer.coefficients, torch.eye(3, dtype=torch.float64)[j])


def test_init_from_weights_with_fewer_templates_is_best_rank_k_approximation():
    original = foreign()
    group = ["block1.0", "block1.2", "block2.0"]
    stacked = torch.stack([original.get_submodule(n).weight.detach().reshape(-1) for n in group])
    model = share(copy.deepcopy(original), 2, init_from_weights=True)
    # independent truncated SVD (Eckart-Young: the best rank-2 approximation in Frobenius norm)
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
    bank = model.block1[0].bank
    got = torch.stack([torch.einsum("k,k...->...", model.get_submodule(n).coefficients, bank.templates).reshape(-1)
                       for n in group])
    torch.testing.assert_close(got, best, rtol=1e-10, atol=1e-10)
    assert math.isclose((got - stacked).norm().item(), s[2].item(), rel_tol=1e-9)
    assert type(model.block2[2]) is nn.Conv2d  # a single layer is not shared


def test_module_used_twice_is_converted_once():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    share(model, 2, allow_growth=True)
    assert isinstance(model[0], SharedConv2d) and model[0] is model[2]
    assert model[0].bank.layers == [model[0]]


def test_share_errors():
    with pytest.raises(SoftshareError, match="selected no Conv1d/Conv2d/Linear"):
        share(foreign(), 2, select="nothing*")
    with pytest.raises(SoftshareError, match="num_templates must be an integer >= 1"):
        share(foreign(), 0)
    with pytest.raises(SoftshareError, match="not the model itself"):
        share(nn.Conv2d(3, 3, 3), 2)
