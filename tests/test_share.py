"""share() on a foreign CNN, layer_similarity and param_groups, against hand computations."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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


class Foreign(nn.Module):
    """A CNN softshare knows nothing about: convs of four 2-D shapes, a Conv1d, a conv with bias."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # (8, 3, 3, 3): 216
        self.block1 = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, bias=False),  # (8, 8, 3, 3): 576
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False, padding_mode="reflect"),  # 576
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding="same", bias=True),  # 576 + bias 8
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),  # (16, 8, 3, 3): 1152
        )
        self.mix = nn.Conv2d(16, 16, 1, bias=False)  # (16, 16, 1, 1): 256
        self.seq = nn.Conv1d(16, 16, 3, padding=1, padding_mode="circular", bias=False)  # (16, 16, 3): 768
        self.fc = nn.Linear(16, 10)  # 160 + 10

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.block1(x)
        x = F.relu(self.block2(x))
        x = F.relu(self.mix(x)).flatten(2)
        return self.fc(self.seq(x).mean(2))


ORIGINAL_PARAMS = 216 + 576 + 576 + 576 + 8 + 1152 + 256 + 768 + 170
CONVS = ["stem", "block1.0", "block1.2", "block2.0", "block2.2", "mix", "seq"]


def foreign(dtype=torch.float64) -> Foreign:
    torch.manual_seed(0)
    return Foreign().to(dtype)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def shared_names(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, SharedLayer)]


def test_foreign_model_parameter_count():
    assert n_params(foreign()) == ORIGINAL_PARAMS


def test_default_shares_every_conv_one_bank_per_shape():
    model = share(foreign(), 2)
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
    model = share(foreign(), 3, select="block1.*")
    assert shared_names(model) == ["block1.0", "block1.2"]
    assert model.block1[0].bank is model.block1[2].bank
    assert type(model.block2[0]) is nn.Conv2d
    assert n_params(model) == ORIGINAL_PARAMS - 2 * 576 + 3 * 576 + 2 * 3

    model = share(foreign(), 2, select=["stem", "fc"])  # several patterns; Linear only when selected
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
    model = share(foreign(), 2, group=lambda name, m: name.split(".")[0])
    assert model.block1[0].bank is model.block1[2].bank
    assert model.block2[0].bank is not model.block1[0].bank
    assert len(named_banks(model)) == 6
    assert n_params(model) == 6128 + 2 * 576 + 0  # one more (8, 8, 3, 3) bank; same coefficients


def test_init_from_weights_with_k_at_least_group_size_keeps_outputs():
    original = foreign()
    weights = {name: original.get_submodule(name).weight.detach().clone() for name in CONVS}
    model = share(copy.deepcopy(original), 3, init_from_weights=True)
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
    # singleton groups (k = 2 > 1 layer) are exact
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(model.block2[2](x), original.block2[2](x), rtol=1e-12, atol=1e-12)


def test_module_used_twice_is_converted_once():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    share(model, 2)
    assert isinstance(model[0], SharedConv2d) and model[0] is model[2]
    assert model[0].bank.layers == [model[0]]


def test_share_errors():
    with pytest.raises(SoftshareError, match="selected no Conv1d/Conv2d/Linear"):
        share(foreign(), 2, select="nothing*")
    with pytest.raises(SoftshareError, match="num_templates must be >= 1"):
        share(foreign(), 0)
    with pytest.raises(SoftshareError, match="not the model itself"):
        share(nn.Conv2d(3, 3, 3), 2)


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
    assert result[1].to_dict() == {"bank": "x.bank", "layers": ["x", "y"], "matrix": [[1.0, 0.0], [0.0, 1.0]]}


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


# -- optimizer groups -----------------------------------------------------------------------
def test_param_groups_put_exactly_the_coefficients_in_no_decay():
    model = nn.ModuleDict({"swrn": create_model("swrn_16_1_2"), "foreign": share(foreign(torch.float32), 2)})
    model["foreign"].fc.weight.requires_grad_(False)  # frozen parameters go nowhere
    groups = param_groups(model, 5e-4)
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    coefficients = {id(m.coefficients) for m in model.modules() if isinstance(m, SharedLayer)}
    assert len(coefficients) == 3 * 2 + 7  # SWRN-16: 3 stages x one shared block x 2 convs
    assert no_decay == coefficients
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert decay == trainable - coefficients
    assert sum(len(g["params"]) for g in groups) == len(trainable)  # no duplicates (shared banks)
    assert id(model["foreign"].fc.weight) not in decay
    plain = param_groups(create_model("wrn_10_1"), 1e-4)
    assert len(plain) == 1 and plain[0]["weight_decay"] == 1e-4
    torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # accepted by an optimizer as is
