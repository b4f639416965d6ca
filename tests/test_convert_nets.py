"""share() on real architectures written out here (torchvision's ResNet-18/50, MobileNetV2 and
ConvNeXt-T layouts): parameter counts against hand-counted layer tables, never more than before."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from softshare import SharedLayer, SoftshareError, share


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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
