"""The model registry and the (S)WRN architecture, checked against hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import softshare
from softshare import SharedConv1d, SharedConv2d, SoftshareError, create_model, list_models, named_banks
from softshare.models import list_families
from softshare.models.wrn import BasicBlock
from softshare.analysis import sharing_stats


def count(name: str, num_classes: int = 10, in_channels: int = 3) -> int:
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, in_channels=in_channels)
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


def test_pretrained_is_one_clear_error():
    with pytest.raises(SoftshareError, match="no pretrained weights"):
        create_model("swrn_16_1_2", pretrained=True)
    assert create_model("swrn_16_1_2", pretrained=False).softshare_config["name"] == "swrn_16_1_2"
