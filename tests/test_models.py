"""The model registry and the (S)WRN architectures, CIFAR-size and ImageNet bottleneck (ResNet-50,
WRN-50-2 and their shared versions), checked against hand computations, torchvision's published
parameter counts and a functional reference forward."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import softshare
from softshare import SharedConv1d, SharedConv2d, SoftshareError, create_model, list_models, named_banks
from softshare.models import list_families
from softshare.analysis import sharing_stats
from softshare.checkpoint import save_checkpoint
from softshare.fold import fold_model
from softshare.models.wrn import BasicBlock, Bottleneck


def count(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> int:
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, in_channels=in_channels, **kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,num_classes,expected", [
    ("wrn_28_10", 10, 36_479_194),
    ("swrn_28_10_1", 10, 12_287_212),
    ("swrn_28_10_2", 10, 17_125_630),
    ("swrn_28_14_2", 10, 33_537_790),
    ("wrn_28_10", 100, 36_536_884),
])
def test_exact_parameter_counts(name, num_classes, expected):
    assert count(name, num_classes) == expected


def wrn_count_by_hand(depth: int, w: int, k: int | None, classes: int = 10, c_in: int = 3) -> int:
    """Stem, per stage: block 0 (two 3x3, BN pair, 1x1 projection if the shape changes),
    later blocks (two 3x3 or a bank of k templates + k coefficients per conv, BN pair), final BN, FC."""
    n = (depth - 4) // 6
    total, previous = 16 * c_in * 9, 16
    for width in (16 * w, 32 * w, 64 * w):
        total += previous * width * 9 + width * width * 9 + 2 * previous + 2 * width
        total += previous * width if previous != width else 0
        later = n - 1
        if k is None:
            total += later * 2 * width * width * 9
        else:
            total += k * width * width * 9 + later * 2 * k
        total += later * 4 * width
        previous = width
    return total + 2 * previous + previous * classes + classes


@pytest.mark.parametrize("name,depth,w,k", [
    ("wrn_16_4", 16, 4, None), ("wrn_22_3", 22, 3, None), ("swrn_16_8_1", 16, 8, 1),
    ("swrn_28_10_6", 28, 10, 6), ("swrn_40_4_3", 40, 4, 3), ("wrn_10_1", 10, 1, None),
])
def test_parameter_counts_match_hand_formula(name, depth, w, k):
    assert count(name, 7, 1) == wrn_count_by_hand(depth, w, k, classes=7, c_in=1)


def test_unshared_equivalent_of_an_swrn_is_the_wrn():
    with torch.device("meta"):
        stats = sharing_stats(create_model("swrn_28_10_2"))
    assert stats.total == 17_125_630
    assert stats.unshared_total == 36_479_194  # coefficients go, every layer gets its own weight
    assert [(b.num_layers, b.num_templates, b.weight_shape) for b in stats.banks] == [
        (6, 2, (160, 160, 3, 3)), (6, 2, (320, 320, 3, 3)), (6, 2, (640, 640, 3, 3))]


def _blocks(model):
    return [block for stage in model.stages for block in stage.blocks]


def test_wrn_structure_strides_widths_no_bias():
    model = create_model("wrn_16_2").double().eval()
    widths = [32, 64, 128]
    convs3 = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs3) == 1 + 6 * 2  # stem + 6n 3x3 convs for depth 6n + 4 (n = 2)
    assert all(m.bias is None for m in model.modules() if isinstance(m, (nn.Conv2d, SharedConv2d)))
    assert model.stem.in_channels == 3 and model.stem.out_channels == 16 and model.stem.stride == (1, 1)
    for stage, width, stride in zip(model.stages, widths, (1, 2, 2)):
        assert stage.blocks[0].conv1.stride == (stride, stride)
        assert all(b.conv1.stride == (1, 1) and b.conv2.stride == (1, 1) for b in stage.blocks[1:])
        assert all(b.conv2.out_channels == width for b in stage.blocks)
    sizes = []
    hooks = [stage.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:]))) for stage in model.stages]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = model(x)
    for h in hooks:
        h.remove()
    assert sizes == [(32, 32, 32), (64, 16, 16), (128, 8, 8)]
    # head: BN-ReLU, global average pool, linear
    features = model.stages[2](model.stages[1](model.stages[0](model.stem(x))))
    expected = model.fc(F.relu(model.bn(features)).mean((2, 3)))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_wrn_block_shortcut_reads_pre_activated_input():
    model = create_model("wrn_16_2").double().eval()
    with torch.no_grad():  # non-trivial BN statistics so that pre-activation differs from input
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_()
                m.bias.normal_()
    seen = {}

    def remember(key):
        return lambda module, args: seen.__setitem__(key(module), args[0].detach())

    hooks = []
    for block in _blocks(model):
        hooks.append(block.register_forward_pre_hook(remember(lambda m: ("in", id(m)))))
        if block.shortcut is not None:
            hooks.append(block.shortcut.register_forward_pre_hook(remember(lambda m: ("short", id(m)))))
    model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    for h in hooks:
        h.remove()

    changes = [b.shortcut is not None for b in _blocks(model)]
    assert changes == [True, False, True, False, True, False]  # the first block of each stage
    for block in _blocks(model):
        x = seen[("in", id(block))]
        pre = F.relu(F.batch_norm(x, block.bn1.running_mean, block.bn1.running_var, block.bn1.weight,
                                  block.bn1.bias, False, 0.0, block.bn1.eps))
        conv_path = block.conv2(F.relu(block.bn2(block.conv1(pre))))
        if block.shortcut is not None:
            assert block.shortcut.kernel_size == (1, 1) and block.shortcut.bias is None
            assert block.shortcut.stride == block.conv1.stride
            torch.testing.assert_close(seen[("short", id(block.shortcut))], pre, rtol=0, atol=0)
            expected = conv_path + block.shortcut(pre)
        else:
            expected = conv_path + x  # identity shortcut adds the raw input
        torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)


def test_swrn_shares_one_bank_per_stage_after_the_first_block():
    model = create_model("swrn_22_2_3")
    banks = named_banks(model)
    assert [name for name, _, _ in banks] == ["stages.0.bank", "stages.1.bank", "stages.2.bank"]
    for (name, bank, users), stage, width in zip(banks, model.stages, (32, 64, 128)):
        assert bank is stage.bank and bank.num_templates == 3 and bank.weight_shape == (width, width, 3, 3)
        later = stage.blocks[1:]
        assert [layer for _, layer in users] == [c for b in later for c in (b.conv1, b.conv2)]
        assert type(stage.blocks[0].conv1) is nn.Conv2d and type(stage.blocks[0].conv2) is nn.Conv2d
        # orthogonal coefficients: 4 layers, k = 3 -> orthonormal columns
        a = torch.stack([layer.coefficients.detach() for _, layer in users]).double()
        torch.testing.assert_close(a.T @ a, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-6)


def test_swrn_matches_wrn_when_weights_are_copied():
    """An SWRN whose templates are the WRN's weights (k = layers, one-hot coefficients) is the WRN."""
    torch.manual_seed(0)
    plain, shared = create_model("wrn_16_2").double().eval(), create_model("swrn_16_2_2").double().eval()
    state = plain.state_dict()
    with torch.no_grad():
        for (name, bank, users), stage in zip(named_banks(shared), ("stages.0", "stages.1", "stages.2")):
            for j, (layer_name, layer) in enumerate(users):
                bank.templates[j].copy_(state[f"{layer_name}.weight"])
                layer.coefficients.copy_(torch.eye(2, dtype=torch.float64)[j])
        for name, tensor in shared.state_dict().items():
            if name in state:
                tensor.copy_(state[name])
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(shared(x), plain(x), rtol=1e-10, atol=1e-10)


# -- every registered family ----------------------------------------------------------------
def small_name(family) -> str:
    if family.small_example:
        return family.small_example
    return min(family.examples, key=count)


def example_input(family, model: nn.Module) -> torch.Tensor:
    size = family.input_size
    if size is None:  # 1-D or 2-D from the first convolution
        first = next((m for m in model.modules()
                      if isinstance(m, (nn.Conv1d, nn.Conv2d, SharedConv1d, SharedConv2d))), None)
        size = (16,) if isinstance(first, (nn.Conv1d, SharedConv1d)) else (16, 16)
    return torch.randn(2, model.softshare_config["in_channels"], *size)


@pytest.mark.parametrize("family", list_families(), ids=lambda f: f.name)
def test_every_family_builds_small_and_trains_on_cpu(family):
    name = small_name(family)
    assert family.pattern.fullmatch(name)
    torch.manual_seed(0)
    model = create_model(name)
    assert model.softshare_config["name"] == name
    model.train()
    out = model(example_input(family, model))
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: parameters without gradient {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_every_family_example_is_constructible_on_meta():
    for family in list_families():
        assert family.examples, family.name
        for name in family.examples:
            assert family.pattern.fullmatch(name) and count(name) > 0
    assert set(list_models()) == {n for f in list_families() for n in f.examples}
    assert set(list_models("swrn_28_*")) == {"swrn_28_10_1", "swrn_28_10_2", "swrn_28_10_6", "swrn_28_14_2"}


def test_create_model_records_its_config_and_rejects_unknown_names():
    model = create_model("swrn_16_1_2", num_classes=5, in_channels=1)
    assert model.softshare_config == {"name": "swrn_16_1_2", "num_classes": 5, "in_channels": 1}
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 5)
    with pytest.raises(SoftshareError, match=r"unknown model 'swrn_28_10'.*did you mean.*swrn_28_10_1"):
        create_model("swrn_28_10")
    with pytest.raises(SoftshareError, match="depth must be 6n\\+4"):
        create_model("wrn_27_2")
    with pytest.raises(SoftshareError, match=">= 1"):
        create_model("swrn_16_2_0")


def test_register_family_validates_small_example():
    with pytest.raises(SoftshareError, match="does not match"):
        softshare.register_family("bogus", r"bogus_(\d+)", ["bogus_1"], small_example="other_1")
    assert "bogus" not in {f.name for f in list_families()}


def test_blocks_are_basic_blocks():
    assert all(isinstance(b, BasicBlock) for b in _blocks(create_model("swrn_16_1_1")))


# -- ImageNet bottleneck nets ------------------------------------------------------------------
SMALL = {"base_width": 8}  # the same structure at 1/8 of the channels


@pytest.mark.parametrize("name,expected", [
    ("resnet_50", 25_557_032),  # torchvision.models.resnet50
    ("wrn_50_2", 68_883_240),  # torchvision.models.wide_resnet50_2
    ("resnet_101", 44_549_160),  # resnet101
    ("wrn_101_2", 126_886_696),  # wide_resnet101_2
])
def test_parameter_counts_equal_torchvision(name, expected):
    assert count(name, 1000) == expected


LAYOUT = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def bottleneck_count_by_hand(depth: int, widen: int, k: int | None, share_1x1: bool = False, classes: int = 1000,
                             base: int = 64) -> int:
    """Stem 7x7 + BN; per stage (planes p = base * 2^s, inner = widen * p, out = 4p): block 0 with a
    1x1 projection + BN; later blocks 1x1 in, 3x3, 1x1 out, three BNs; with k templates the later
    blocks' 3x3 (and with share_1x1 their 1x1) weights become k templates + k coefficients per layer."""
    total, previous = 3 * base * 49 + 2 * base, base
    for s, n in enumerate(LAYOUT[depth]):
        p = base * 2 ** s
        inner, out = widen * p, 4 * p
        total += previous * inner + inner * inner * 9 + inner * out + previous * out  # block 0 convs + projection
        total += 2 * (inner + inner + out + out)  # block 0 BNs (+ the projection's)
        later = n - 1
        total += later * 2 * (inner + inner + out)  # their BNs
        c3, c1 = inner * inner * 9, 2 * out * inner
        total += (k * c3 + later * k) if k else later * c3
        total += (2 * k * out * inner + 2 * later * k) if (k and share_1x1) else later * c1
        previous = out
    return total + previous * classes + classes


@pytest.mark.parametrize("name,depth,widen,k,kwargs", [
    ("resnet_50", 50, 1, None, {}), ("wrn_50_2", 50, 2, None, {}), ("wrn_101_2", 101, 2, None, {}),
    ("swrn_50_2_1", 50, 2, 1, {}), ("swrn_50_2_2", 50, 2, 2, {}), ("swrn_50_2_4", 50, 2, 4, {}),
    ("sresnet_50_2", 50, 1, 2, {}), ("swrn_50_2_2", 50, 2, 2, {"share_1x1": True}),
    ("sresnet_101_3", 101, 1, 3, {"share_1x1": True}), ("swrn_26_3_2", 26, 3, 2, {"base_width": 16}),
])
def test_parameter_counts_match_hand_formula(name, depth, widen, k, kwargs):
    base = kwargs.get("base_width", 64)
    assert count(name, 1000, **kwargs) == bottleneck_count_by_hand(depth, widen, k, kwargs.get("share_1x1", False),
                                                                   1000, base)
    assert count(name, 7, **kwargs) == bottleneck_count_by_hand(depth, widen, k, kwargs.get("share_1x1", False),
                                                                7, base)


def test_documented_counts_and_unshared_equivalent():
    """The table in docs/imagenet.md."""
    expected = {"wrn_50_2": 68_883_240, "swrn_50_2_1": 48_681_780, "swrn_50_2_2": 61_215_552,
                "swrn_50_2_4": 86_283_096, "resnet_50": 25_557_032, "sresnet_50_1": 20_506_676,
                "sresnet_50_2": 23_640_128, "sresnet_50_4": 29_907_032}
    assert {name: count(name, 1000) for name in expected} == expected
    with torch.device("meta"):
        stats = sharing_stats(create_model("swrn_50_2_2", num_classes=1000))
    assert stats.unshared_total == 68_883_240  # coefficients go, every 3x3 gets its own weight again
    assert [(b.num_layers, b.weight_shape) for b in stats.banks] == [
        (2, (128, 128, 3, 3)), (3, (256, 256, 3, 3)), (5, (512, 512, 3, 3)), (2, (1024, 1024, 3, 3))]


def test_names_route_to_the_right_family():
    assert type(create_model("wrn_16_1")).__name__ == "WideResNet"  # CIFAR names unchanged
    assert type(create_model("swrn_16_1_2")).__name__ == "WideResNet"
    assert type(create_model("wrn_26_1", **SMALL)).__name__ == "BottleneckResNet"
    with pytest.raises(SoftshareError, match="depth must be 6n\\+4"):
        create_model("wrn_27_2")  # still the CIFAR family's message for CIFAR-style names
    with pytest.raises(SoftshareError, match=">= 1"):
        create_model("swrn_50_2_0")
    with pytest.raises(SoftshareError, match="unknown model"):
        create_model("resnet_34")


def reference_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ResNet forward (eval mode) written out with functional ops and the model's weights."""
    def bn(prefix, t):
        return F.batch_norm(t, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                            state[f"{prefix}.weight"], state[f"{prefix}.bias"], False, 0.0, 1e-5)

    state = {k: v for k, v in model.state_dict().items()}
    for name, module in model.named_modules():  # shared convs: their mixed weight
        if isinstance(module, SharedConv2d):
            state[f"{name}.weight"] = module.weight.detach()
    out = F.max_pool2d(F.relu(bn("bn1", F.conv2d(x, state["conv1.weight"], stride=2, padding=3))), 3, 2, 1)
    for s, stage in enumerate(model.stages):
        for b in range(len(stage.blocks)):
            p = f"stages.{s}.blocks.{b}"
            stride = 2 if (s > 0 and b == 0) else 1
            h = F.relu(bn(f"{p}.bn1", F.conv2d(out, state[f"{p}.conv1.weight"])))
            h = F.relu(bn(f"{p}.bn2", F.conv2d(h, state[f"{p}.conv2.weight"], stride=stride, padding=1)))
            h = bn(f"{p}.bn3", F.conv2d(h, state[f"{p}.conv3.weight"]))
            if f"{p}.downsample.0.weight" in state:
                out = bn(f"{p}.downsample.1", F.conv2d(out, state[f"{p}.downsample.0.weight"], stride=stride))
            out = F.relu(h + out)
    return F.linear(out.mean((2, 3)), state["fc.weight"], state["fc.bias"])


def randomise_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)


@pytest.mark.parametrize("name,kwargs", [("wrn_26_2", {}), ("swrn_50_2_2", {}), ("sresnet_26_2", {"share_1x1": True})])
def test_forward_matches_functional_reference_and_shapes(name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, **SMALL, **kwargs).double().eval()
    randomise_bn(model)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference_forward(model, x), rtol=1e-10, atol=1e-10)
    # strides and widths at 224 px: stem /4, stages /1 /2 /2 /2, out = 4 x planes
    sizes = []
    hooks = [stage.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:]))) for stage in model.stages]
    model(torch.randn(1, 3, 224, 224, dtype=torch.float64))
    for h in hooks:
        h.remove()
    assert sizes == [(32, 56, 56), (64, 28, 28), (128, 14, 14), (256, 7, 7)]
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    for s, stage in enumerate(model.stages):
        first = stage.blocks[0]
        assert first.conv1.stride == (1, 1) and first.conv2.stride == ((2, 2) if s else (1, 1))  # v1.5
        assert first.downsample[0].kernel_size == (1, 1) and first.downsample[0].stride == first.conv2.stride
        assert all(b.downsample is None for b in stage.blocks[1:])


def test_shared_banks_per_stage_orthogonal_coefficients_no_decay():
    model = create_model("swrn_50_2_2", **SMALL)
    banks = named_banks(model)
    assert [name for name, _, _ in banks] == [f"stages.{s}.bank" for s in range(4)]
    for (_, bank, users), stage in zip(banks, model.stages):
        assert [layer for _, layer in users] == [b.conv2 for b in stage.blocks[1:]]
        assert all(type(b.conv1) is nn.Conv2d and type(b.conv3) is nn.Conv2d for b in stage.blocks)
        assert type(stage.blocks[0].conv2) is nn.Conv2d
        a = torch.stack([layer.coefficients.detach() for _, layer in users]).double()
        gram = a.T @ a if len(users) >= 2 else a @ a.T  # 2 templates: orthonormal columns (or one unit row)
        torch.testing.assert_close(gram, torch.eye(len(gram), dtype=torch.float64), rtol=0, atol=1e-6)
    groups = softshare.param_groups(model, weight_decay=1e-4)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    coefficients = {id(m.coefficients) for m in model.modules() if isinstance(m, SharedConv2d)}
    assert no_decay == coefficients and len(coefficients) == 2 + 3 + 5 + 2

    both = create_model("swrn_50_2_2", share_1x1=True, **SMALL)
    names = [name for name, _, _ in named_banks(both)]
    assert names == [f"stages.{s}.{b}" for s in range(4) for b in ("bank_1x1_in", "bank", "bank_1x1_out")]
    for stage in both.stages:
        assert all(isinstance(getattr(b, c), SharedConv2d) for b in stage.blocks[1:] for c in ("conv1", "conv2", "conv3"))


def test_shared_net_equals_unshared_when_templates_are_its_weights():
    torch.manual_seed(0)
    plain = create_model("resnet_50", num_classes=4, **SMALL).double().eval()
    shared = create_model("sresnet_50_5", num_classes=4, share_1x1=True, **SMALL).double().eval()
    randomise_bn(plain)
    state = plain.state_dict()
    with torch.no_grad():
        for name, tensor in shared.state_dict().items():
            if name in state:
                tensor.copy_(state[name])
        for _, bank, users in named_banks(shared):
            for j, (layer_name, layer) in enumerate(users):  # at most 5 layers per bank: one template each
                bank.templates[j].copy_(state[f"{layer_name}.weight"])
                layer.coefficients.copy_(torch.eye(5, dtype=torch.float64)[j])
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(shared(x), plain(x), rtol=1e-10, atol=1e-10)


def test_share_converts_resnet_into_the_registered_shared_net():
    """softshare.share on the unshared net (later blocks' 3x3 convs, one bank per stage) gives sresnet's count."""
    model = create_model("resnet_50", **SMALL)
    later_3x3 = re.compile(r"stages\.\d\.blocks\.[1-9]\d*\.conv2")
    softshare.share(model, 2, select=lambda n, m: bool(later_3x3.fullmatch(n)), group_by="stage",
                    allow_growth=True)  # stages 0 and 3 have 2 later blocks: a k=2 bank saves nothing there
    assert sum(p.numel() for p in model.parameters()) == count("sresnet_50_2", 10, **SMALL)


def test_zero_init_residual_makes_later_blocks_identities():
    model = create_model("swrn_26_2_2", zero_init_residual=True, **SMALL).eval()
    bns = [b.bn3 for stage in model.stages for b in stage.blocks]
    assert all(torch.count_nonzero(bn.weight) == 0 for bn in bns)
    x = torch.rand(2, 4 * 8, 16, 16)  # non-negative, like every block input
    torch.testing.assert_close(model.stages[0].blocks[1](x), x)
    assert all(torch.count_nonzero(bn.weight) > 0 for bn in (b.bn3 for b in create_model("resnet_26", **SMALL).modules()
                                                          if isinstance(b, Bottleneck)))


def test_fold_collinear_blocks_exactly_and_refuse_share_1x1():
    torch.manual_seed(0)
    model = create_model("swrn_50_1_2", num_classes=3, **SMALL).double().eval()
    randomise_bn(model)
    with torch.no_grad():  # stage 2 (5 shared blocks): make all 3x3 coefficients collinear
        users = [b.conv2 for b in model.stages[2].blocks[1:]]
        for t, layer in enumerate(users):
            layer.coefficients.copy_(users[0].coefficients * (0.5 + 0.25 * t))
    result = fold_model(model, threshold=1.0)
    assert result.loops == [[1, 1], [1, 1, 1], [5], [1, 1]]
    assert result.params_after < count("wrn_50_1", 3, **SMALL)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-9, atol=1e-9)
    with pytest.raises(SoftshareError, match="share_1x1"):
        create_model("swrn_50_1_2", share_1x1=True, fold={"loops": [[2], [3], [5], [2]]}, **SMALL)


def test_checkpoint_channels_last_bf16_and_lsm(tmp_path):
    torch.manual_seed(0)
    model = create_model("swrn_26_2_2", num_classes=3, share_1x1=True, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    save_checkpoint(tmp_path / "ckpt", model)
    loaded = softshare.load(tmp_path / "ckpt")
    assert loaded.softshare_config == {"name": "swrn_26_2_2", "num_classes": 3, "in_channels": 3,
                                       "share_1x1": True, "base_width": 8}
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    softshare.to_channels_last(loaded)
    assert loaded.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(loaded(x.contiguous(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loaded(x)
    assert low.dtype == torch.bfloat16 and torch.allclose(low.float(), expected, rtol=0.1, atol=0.1)
    lsm = softshare.layer_similarity(loaded)
    assert len(lsm) == 12 and all(s.matrix.shape == (1, 1) for s in lsm)  # depth 26: one shared block per stage


def test_pretrained_is_one_clear_error():
    with pytest.raises(SoftshareError, match="no pretrained weights"):
        create_model("swrn_16_1_2", pretrained=True)
    assert create_model("swrn_16_1_2", pretrained=False).softshare_config["name"] == "swrn_16_1_2"
