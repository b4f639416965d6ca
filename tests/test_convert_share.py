"""share() on a foreign CNN and on real architectures, unshare(), layer_similarity and param_groups,
against hand computations."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

from safetensors.torch import save_file
from torch.nn.utils import parametrize

from helpers import (BODY, Conv2dSame, FrozenKernelConv2d, ScaledStdConv2d, StdConv2d, TaggedConv2d, TimmLinear,
                     foreign, pad_same, plain_net, subclass_net)
from softshare import (
    SharedConv1d,
    SharedConv2d,
    SharedLayer,
    SharedLinear,
    SoftshareError,
    TemplateBank,
    create_model,
    layer_similarity,
    load_into,
    named_banks,
    param_groups,
    save_checkpoint,
    share,
    unshare,
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
    model = share(foreign(), 2, group_by=lambda name, m: name.split(".")[0], allow_growth=True)
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


# -- Conv/Linear subclasses (timm-style stand-ins in helpers.py) ------------------------------------
CONVS_AND_LINEARS = lambda name, m: isinstance(m, (nn.Conv2d, nn.Linear)) and name != "head"  # noqa: E731


def _mix(layer) -> torch.Tensor:
    return torch.einsum("k,k...->...", layer.coefficients, layer.bank.templates)


def test_subclasses_share_through_their_own_forward():
    model = subclass_net()
    before = n_params(model)
    plan = share(model, 2, select=CONVS_AND_LINEARS, dry_run=True)
    assert {(g.kind, len(g.layers), g.shared) for g in plan.groups} == {
        ("StdConv2d", 3, True), ("Conv2dSame", 3, True), ("ScaledStdConv2d", 3, True), ("TaggedConv2d", 3, True),
        ("TimmLinear", 3, True), ("Conv2d", 1, False)}
    assert [(s.name, s.kind) for s in plan.skipped] == [(f"frozen.{i}", "FrozenKernelConv2d") for i in range(3)] + [
        ("head", "Linear")]
    share(model, 2, select=CONVS_AND_LINEARS)
    d3, d1 = 8 * 8 * 9, 8 * 8
    saved = 3 * (3 * d3 - (2 * d3 + 6)) + 2 * (3 * d1 - (2 * d1 + 6))
    assert n_params(model) == plan.params_after == before - saved
    assert isinstance(model.std[1], StdConv2d) and isinstance(model.std[1], SharedLayer)
    assert type(model.frozen[0]) is FrozenKernelConv2d and model.tagged[0].tag == "mine"
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        # the subclass's transform applies to the mixed weight: standardisation by hand
        w = _mix(model.std[1])
        flat = w.reshape(8, -1)
        standardised = ((flat - flat.mean(1, keepdim=True)) / (flat.var(1, unbiased=False, keepdim=True) + 1e-6).sqrt())
        expected = nn.functional.conv2d(x, standardised.reshape_as(w), model.std[1].bias, padding=1)
        torch.testing.assert_close(model.std[1](x), expected, rtol=1e-10, atol=1e-10)
        # 'same' padding of a strided conv computed from the input, on the mixed weight
        expected = nn.functional.conv2d(pad_same(x, (3, 3), (2, 2), (1, 1)), _mix(model.same[0]), model.same[0].bias,
                                        stride=2)
        torch.testing.assert_close(model.same[0](x), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model.mlp[2](x[:, :, 0, 0]), x[:, :, 0, 0] @ _mix(model.mlp[2]).T + model.mlp[2].bias)
    model(torch.randn(2, 3, 12, 12, dtype=torch.float64)).square().sum().backward()
    assert model.scaled[0].gain.grad is not None and model.scaled[0].bank.templates.grad.abs().sum() > 0


def test_subclasses_keep_outputs_round_trip_and_unshare(tmp_path):
    original = subclass_net().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    model = share(copy.deepcopy(original), 3, select=CONVS_AND_LINEARS, init_from_weights=True, allow_growth=True)
    torch.testing.assert_close(model(x), original(x), rtol=1e-9, atol=1e-10)  # k = group size: exact weights
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone.std[0]) is type(model.std[0])
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
    fresh = subclass_net()
    save_checkpoint(tmp_path / "ck", model)
    load_into(fresh, tmp_path / "ck")
    torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=0)
    unshare(model)
    assert [type(m) for m in (model.std[0], model.same[0], model.scaled[0], model.tagged[0], model.mlp[0])] == [
        StdConv2d, Conv2dSame, ScaledStdConv2d, TaggedConv2d, TimmLinear]
    assert not any(isinstance(m, (SharedLayer, TemplateBank)) for m in model.modules())
    torch.testing.assert_close(model(x), original(x), rtol=1e-9, atol=1e-10)
    assert n_params(model) == n_params(original)


def test_every_layer_not_converted_is_named_with_its_reason():
    conv = nn.Conv2d(8, 8, 3)
    parametrize.register_parametrization(conv, "weight", nn.Identity())
    model = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3), conv, nn.Conv3d(8, 8, 1),
                          FrozenKernelConv2d(8, 8, 3), nn.Linear(8, 8))
    plan = share(model, 2, select="*", dry_run=True)
    reasons = {s.name: s.reason for s in plan.skipped}
    assert set(reasons) == {"3", "4", "5"}
    assert "parametrization" in reasons["3"] and "Conv1d, Conv2d and Linear" in reasons["4"]
    assert "does not depend on `self.weight`" in reasons["5"]
    summary = plan.summary()
    assert "not converted  FrozenKernelConv2d x1: its output does not depend" in summary
    assert "not converted  Conv3d x1" in summary
    default = share(model, 2, dry_run=True)
    assert [(s.name, s.reason.split(" (")[0]) for s in default.skipped if s.kind == "Linear"] == [("6", "not selected")]
    with pytest.raises(SoftshareError, match="lazy layers whose weights are not created yet; run one forward"):
        share(nn.Sequential(nn.Conv2d(8, 8, 3), nn.LazyConv2d(8, 3)), 1, dry_run=True)
    with pytest.raises(SoftshareError, match="FrozenKernelConv2d: its output does not depend"):
        share(nn.Sequential(FrozenKernelConv2d(8, 8, 3), FrozenKernelConv2d(8, 8, 3)), 1)


def test_subclass_plan_on_the_meta_device_matches_and_leaves_the_rng_alone():
    plan = share(subclass_net(), 2, select=CONVS_AND_LINEARS, dry_run=True)
    with torch.device("meta"):
        model = subclass_net()
    state = torch.get_rng_state()
    meta_plan = share(model, 2, select=CONVS_AND_LINEARS, dry_run=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert meta_plan.groups == plan.groups and meta_plan.skipped == plan.skipped


# -- group_by -------------------------------------------------------------------------------------------
class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_reduce, self.conv_expand = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1)


class MobileBlock(nn.Module):
    """A MobileNetV3-style block whose squeeze-excite convs have the main path's shape."""

    def __init__(self):
        super().__init__()
        self.conv_pw, self.se, self.conv_pwl = nn.Conv2d(16, 16, 1), SqueezeExcite(), nn.Conv2d(16, 16, 1)


def two_stage_net() -> nn.Module:
    """stem, then 2 stages of 3 blocks: 24 convs of one shape (16, 16, 1, 1), 12 per stage."""
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.Sequential(*[MobileBlock() for _ in range(3)]),
                         nn.Sequential(*[MobileBlock() for _ in range(3)]))


@pytest.mark.parametrize("group_by, k, banks", [
    ("shape", 2, [24]),
    ("stage", 2, [12, 12]),  # the paper's: one bank per stage
    ("parent", 1, [2] * 12),  # a block's conv_pw + conv_pwl; its SE's two convs
    (lambda name, m: ".se." in name, 2, [12, 12]),  # squeeze-excite apart from the main path
])
def test_group_by(group_by, k, banks):
    plan = share(two_stage_net(), k, group_by=group_by, dry_run=True)
    shared = [g for g in plan.groups if g.shared]
    assert [len(g.layers) for g in shared] == banks
    d = 16 * 16
    assert plan.params_before - plan.params_after == sum(n * d - (k * d + n * k) for n in banks)
    if group_by == "stage":
        assert [{name.split(".")[0] for name in g.layers} for g in shared] == [{"1"}, {"2"}]
    if callable(group_by):
        assert all(".se." in name for name in shared[1].layers)


class ConvLayer(nn.Module):  # Hugging Face ResNet's names: one conv per "layer"
    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__()
        self.convolution, self.normalization = nn.Conv2d(cin, cout, kernel, bias=False), nn.BatchNorm2d(cout)


class HFBottleneck(nn.Module):
    def __init__(self, cin: int, width: int):
        super().__init__()
        self.shortcut = ConvLayer(cin, 4 * width, 1) if cin != 4 * width else nn.Identity()
        self.layer = nn.Sequential(ConvLayer(cin, width, 1), ConvLayer(width, width, 3), ConvLayer(width, 4 * width, 1))


class HFStage(nn.Module):
    def __init__(self, cin: int, width: int, depth: int):
        super().__init__()
        self.layers = nn.Sequential(*[HFBottleneck(cin if i == 0 else 4 * width, width) for i in range(depth)])


def hf_resnet_like() -> nn.Module:
    """`resnet.encoder.stages.N.layers.M.layer.K.convolution`, as transformers' ResNetModel names them."""
    encoder = nn.Module()
    encoder.stages = nn.ModuleList([HFStage(8, 4, 3), HFStage(16, 4, 3)])  # stage 0 opens with a shortcut conv
    resnet = nn.Module()
    resnet.encoder = encoder
    model = nn.Module()
    model.resnet = resnet
    return model


def test_group_by_stage_finds_the_stages_of_common_layouts():
    plan = share(hf_resnet_like(), 1, group_by="stage", allow_growth=True, dry_run=True)
    prefixes = {".".join(name.split(".")[:5]) for g in plan.groups for name in g.layers}
    assert prefixes == {"resnet.encoder.stages.0.layers", "resnet.encoder.stages.1.layers"}
    for g in plan.groups:  # every bank within one stage, shortcuts with the convs of their stage
        assert len({name.split(".")[3] for name in g.layers}) == 1
    assert any(name.endswith("0.shortcut.convolution") for g in plan.groups for name in g.layers)
    # by shape: 5 banks (4x8 1x1, 4x4 3x3, 16x4 1x1, the 16x8 shortcut, 4x16 1x1); by stage the 3 shapes
    # both stages have are split: 8
    assert (len(share(hf_resnet_like(), 1, allow_growth=True, dry_run=True).groups), len(plan.groups)) == (5, 8)

    from helpers import resnet18
    plan = share(resnet18(), 1, group_by="stage", allow_growth=True, dry_run=True)
    stages = {tuple(g.layers): {name.split(".")[0] for name in g.layers} for g in plan.groups}
    assert all(len(names) == 1 for names in stages.values())  # never across stages
    assert {"layer2"} in stages.values() and stages[("layer2.0.downsample.0",)] == {"layer2"}
    with torch.device("meta"):
        swrn = create_model("wrn_28_2", num_classes=10)
    plan = share(swrn, 2, group_by="stage", dry_run=True)
    assert {g.layers[0].rsplit(".", 2)[0] for g in plan.shared_groups} == {f"stages.{i}.blocks" for i in range(3)}


def test_group_by_rejects_unknown_rules():
    with pytest.raises(SoftshareError, match="group_by must be one of shape, stage, parent or a function"):
        share(two_stage_net(), 2, group_by="block")


# -- real architectures: torchvision's ResNet-18/50, MobileNetV2 and ConvNeXt-T layouts --------------
# -- the nets (torchvision's layouts, so their totals are the published ones) ----------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(inplanes, planes, stride, self.expansion)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = _downsample(inplanes, planes, stride, self.expansion)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (self.downsample(x) if self.downsample is not None else x))


def _downsample(inplanes: int, planes: int, stride: int, expansion: int) -> nn.Module | None:
    if stride == 1 and inplanes == planes * expansion:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, planes * expansion, 1, stride, bias=False),
                         nn.BatchNorm2d(planes * expansion))


class ResNet(nn.Module):
    def __init__(self, block, layers: list[int], num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes, stages = 64, []
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(count):
                blocks.append(block(inplanes, planes, 2 if (i > 0 and j == 0) else 1))
                inplanes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(), nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and inp == out

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]  # expansion t, channels c, blocks n, stride s

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        features: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32),
                                                   nn.ReLU6())]
        inp = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        features.append(nn.Sequential(nn.Conv2d(inp, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(nn.functional.gelu(self.pwconv1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + self.layer_scale * y


class ConvNeXt(nn.Module):
    def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), num_classes: int = 1000):
        super().__init__()
        stages: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))]
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            stages.append(nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(depth)]))
            if i + 1 < len(dims):
                stages.append(nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*stages)
        self.norm = LayerNorm2d(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        return self.head(self.norm(self.features(x)).mean((2, 3)))


# -- hand-counted layer tables: (weight shape, how many layers of it) for the default selection ----
RESNET18_CONVS = [
    ((64, 3, 7, 7), 1), ((64, 64, 3, 3), 4),
    ((128, 64, 3, 3), 1), ((128, 128, 3, 3), 3), ((128, 64, 1, 1), 1),
    ((256, 128, 3, 3), 1), ((256, 256, 3, 3), 3), ((256, 128, 1, 1), 1),
    ((512, 256, 3, 3), 1), ((512, 512, 3, 3), 3), ((512, 256, 1, 1), 1),
]
RESNET50_CONVS = [
    ((64, 3, 7, 7), 1),
    # layer1: conv1 of block 0, then blocks 1-2; conv2 x3; conv3 x3 and the downsample share a shape
    ((64, 64, 1, 1), 1), ((64, 256, 1, 1), 2), ((64, 64, 3, 3), 3), ((256, 64, 1, 1), 4),
    ((128, 256, 1, 1), 1), ((128, 512, 1, 1), 3), ((128, 128, 3, 3), 4), ((512, 128, 1, 1), 4), ((512, 256, 1, 1), 1),
    ((256, 512, 1, 1), 1), ((256, 1024, 1, 1), 5), ((256, 256, 3, 3), 6), ((1024, 256, 1, 1), 6),
    ((1024, 512, 1, 1), 1),
    ((512, 1024, 1, 1), 1), ((512, 2048, 1, 1), 2), ((512, 512, 3, 3), 3), ((2048, 512, 1, 1), 3),
    ((2048, 1024, 1, 1), 1),
]
MOBILENETV2_CONVS = [  # expand 1x1 / depthwise 3x3 / project 1x1; a stage's first block widens
    ((32, 3, 3, 3), 1), ((32, 1, 3, 3), 1), ((16, 32, 1, 1), 1),
    ((96, 16, 1, 1), 1), ((96, 1, 3, 3), 1), ((24, 96, 1, 1), 1),
    ((144, 24, 1, 1), 2), ((144, 1, 3, 3), 2), ((24, 144, 1, 1), 1), ((32, 144, 1, 1), 1),
    ((192, 32, 1, 1), 3), ((192, 1, 3, 3), 3), ((32, 192, 1, 1), 2), ((64, 192, 1, 1), 1),
    ((384, 64, 1, 1), 4), ((384, 1, 3, 3), 4), ((64, 384, 1, 1), 3), ((96, 384, 1, 1), 1),
    ((576, 96, 1, 1), 3), ((576, 1, 3, 3), 3), ((96, 576, 1, 1), 2), ((160, 576, 1, 1), 1),
    ((960, 160, 1, 1), 3), ((960, 1, 3, 3), 3), ((160, 960, 1, 1), 2), ((320, 960, 1, 1), 1),
    ((1280, 320, 1, 1), 1),
]
CONVNEXT_CONVS = [  # stem, depthwise 7x7 per block, downsampling 2x2
    ((96, 3, 4, 4), 1), ((96, 1, 7, 7), 3), ((192, 96, 2, 2), 1), ((192, 1, 7, 7), 3),
    ((384, 192, 2, 2), 1), ((384, 1, 7, 7), 9), ((768, 384, 2, 2), 1), ((768, 1, 7, 7), 3),
]
CONVNEXT_LINEARS = [((384, 96), 3), ((96, 384), 3), ((768, 192), 3), ((192, 768), 3),
                    ((1536, 384), 9), ((384, 1536), 9), ((3072, 768), 3), ((768, 3072), 3)]

# builder, torchvision's published total, the hand table, the layers share() may pick
NETS = {
    "resnet18": (lambda: ResNet(BasicBlock, [2, 2, 2, 2]), 11_689_512, RESNET18_CONVS, None),
    "resnet50": (lambda: ResNet(Bottleneck, [3, 4, 6, 3]), 25_557_032, RESNET50_CONVS, None),
    "mobilenet_v2": (MobileNetV2, 3_504_872, MOBILENETV2_CONVS, None),
    "convnext_tiny": (ConvNeXt, 28_589_128, CONVNEXT_CONVS, None),
    "convnext_tiny+mlp": (ConvNeXt, 28_589_128, CONVNEXT_CONVS + CONVNEXT_LINEARS,
                          lambda name, m: isinstance(m, (nn.Conv2d, nn.Linear)) and "head" not in name),
}


def expected_after(total: int, table, k: int) -> int:
    """A group of n layers of D weights becomes k templates + n*k coefficients iff that is fewer."""
    after = total
    for shape, n in table:
        d = math.prod(shape)
        if k * d + n * k < n * d:
            after += k * d + n * k - n * d
    return after


def test_hand_tables_cover_every_selected_layer():
    for name, (build, total, table, select) in NETS.items():
        with torch.device("meta"):
            model = build()
        assert n_params(model) == total, name  # the nets are torchvision's
        layers = [m for n, m in model.named_modules()
                  if (select(n, m) if select else isinstance(m, nn.Conv2d))]
        assert sum(n for _, n in table) == len(layers), name
        shapes = sorted(tuple(m.weight.shape) for m in layers)
        assert shapes == sorted(shape for shape, n in table for _ in range(n)), name


def test_resnet18_counts_by_hand():
    # k=2: the 4 (64,64,3,3) convs and each stage's 3 square 3x3 convs share a bank
    saved = (4 - 2) * 36_864 - 8 + sum((3 - 2) * d - 6 for d in (147_456, 589_824, 2_359_296))
    assert expected_after(11_689_512, RESNET18_CONVS, 2) == 11_689_512 - saved == 8_519_234
    # k=4: no shape has more than 4 layers, so nothing can be saved
    assert expected_after(11_689_512, RESNET18_CONVS, 4) == 11_689_512


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("k", [2, 4])
def test_share_defaults_match_hand_counts_and_never_grow(name, k):
    build, total, table, select = NETS[name]
    expected = expected_after(total, table, k)
    assert expected <= total
    with torch.device("meta"):  # counts only: no memory, no init
        model = build()
    plan = share(model, k, select=select, dry_run=True)
    assert (plan.params_before, plan.params_after) == (total, expected)
    if expected == total:
        with pytest.raises(SoftshareError, match="allow_growth"):
            share(model, k, select=select)
        return
    share(model, k, select=select)
    assert n_params(model) == expected < total
    shared = sum(1 for m in model.modules() if isinstance(m, SharedLayer))
    assert shared == sum(n for shape, n in table if k * math.prod(shape) + n * k < n * math.prod(shape))


@pytest.mark.parametrize("name", list(NETS))
def test_share_init_from_weights_counts_and_runs(name):
    build, total, table, select = NETS[name]
    torch.manual_seed(0)
    original = build().eval()
    model = share(copy.deepcopy(original), 2, select=select, init_from_weights=True).eval()
    assert n_params(model) == expected_after(total, table, 2) < total
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out, ref = model(x), original(x)
    assert out.shape == ref.shape == (1, 1000) and torch.isfinite(out).all()


def test_allow_growth_is_the_only_way_to_grow():
    with torch.device("meta"):
        model = ResNet(BasicBlock, [2, 2, 2, 2])
    share(model, 4, allow_growth=True)  # every conv shape gets a bank of 4 templates
    grown = sum(4 * math.prod(shape) + n * 4 - n * math.prod(shape) for shape, n in RESNET18_CONVS)
    assert n_params(model) == 11_689_512 + grown > 11_689_512


# -- unshare ------------------------------------------------------------------------------------
def test_unshare_restores_plain_layers_with_identical_outputs(tmp_path):
    original = plain_net()
    model = share(copy.deepcopy(original), 2).eval()
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    assert unshare(model) is model
    assert not any(isinstance(m, (SharedLayer, TemplateBank)) for m in model.modules())
    assert [type(model.get_submodule(n)) for n in BODY] == [nn.Conv2d] * 6
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
    assert n_params(model) == n_params(original)
    # what Hugging Face save_pretrained refuses: tensors shared between keys (never at /dev/null:
    # safetensors writes a temporary file and renames it over the target, so root would replace it)
    with pytest.raises(RuntimeError, match="share memory"):
        save_file(share(plain_net(), 2).state_dict(), tmp_path / "shared.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "unshared.safetensors")
    assert (tmp_path / "unshared.safetensors").stat().st_size > 0


def test_unshare_keeps_training_state_and_trains():
    model = share(plain_net(), 2)
    unshare(model)
    assert model.training and all(p.requires_grad for p in model.parameters())
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
