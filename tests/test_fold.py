"""Folding soft-shared blocks into explicit loops (softshare.fold)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn

from helpers import _collinear_swrn, exact_kernels
from softshare import SharedConv1d, SoftshareError, TemplateBank, create_model, share
from softshare.fold import (
    LoopBlock,
    find_groups,
    fold_model,
    loop_blocks,
    loop_direction,
    set_iterations,
    sweep,
    write_fold_report,
    write_sweep,
)


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _loop_params(width: int, length: int) -> int:
    """Two 3x3 convs once; per iteration two BatchNorms (weight + bias) and two scales."""
    return 2 * 9 * width * width + length * (2 * 2 * width + 2)


def _swrn_28_1_params(stage_blocks) -> int:
    """swrn_28_1 parameters with each stage's shared blocks costing `stage_blocks(stage, width)`."""
    total = 3 * 16 * 9 + 2 * 64 + 64 * 10 + 10  # stem, final BN, classifier
    previous = 16
    for stage, width in enumerate((16, 32, 64)):
        shortcut = previous * width if previous != width else 0
        total += 2 * previous + 2 * width + 9 * previous * width + 9 * width * width + shortcut  # block 0
        total += stage_blocks(stage, width)
        previous = width
    return total


def test_exact_fold_at_threshold_one_matches_original(collinear, inputs, device):
    """float64 on the device under test (`--device`)."""
    model = copy.deepcopy(collinear).to(device)
    result = fold_model(model, 1.0)
    assert result.loops == [[3], [2, 1], [1, 1, 1]]
    assert [(g.container, g.blocks) for g in result.groups if g.length > 1] == [
        ("stages.0.blocks", [1, 2, 3]), ("stages.1.blocks", [1, 2])]
    assert not any(isinstance(m, type(collinear.stages[0].bank)) for m in result.model.modules())
    folded, x = result.model.to(device), inputs.to(device)
    with exact_kernels(device), torch.no_grad():
        expected, got = model(x), folded(x)
    assert got.device.type == device.type
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert not result.model.training
    # the scales recover the construction: c_t / c_0 are the scales used, signs included
    scales = result.groups[0].scales["conv1"]
    assert [c / scales[0] for c in scales] == pytest.approx([1.0, -2.5, 0.3])


def test_parameter_counts_by_hand(collinear):
    result = fold_model(collinear, 1.0)
    bank = lambda stage, width: 2 * 9 * width * width + 3 * 2 * 2 + 3 * 2 * 2 * width  # noqa: E731
    loops = {0: [3], 1: [2, 1], 2: [1, 1, 1]}
    folded = lambda stage, width: sum(_loop_params(width, n) for n in loops[stage])  # noqa: E731
    assert result.params_before == _swrn_28_1_params(bank) == sum(p.numel() for p in collinear.parameters())
    assert result.params_after == _swrn_28_1_params(folded)


def test_only_blocks_similar_in_every_role_fold(collinear):
    model = _collinear_swrn()
    with torch.no_grad():  # stage 0, block 3: conv1 still collinear, conv2 now 0.9-similar
        a = model.stages[0].blocks[1].conv2.coefficients
        orthogonal = torch.stack([-a[1], a[0]])
        model.stages[0].blocks[3].conv2.coefficients.copy_(0.9 * a + (1 - 0.81) ** 0.5 * orthogonal)
    assert fold_model(model, 0.95).loops[0] == [2, 1]
    assert fold_model(model, 0.85).loops[0] == [3]
    # stage 2 kept its orthogonally initialised, non-collinear coefficients
    assert fold_model(collinear, 0.99).loops[2] == [1, 1, 1]


def test_find_groups_is_complete_linkage_and_greedy():
    angles = torch.tensor([0.0, 0.1, 0.2, 1.5])  # 0~1, 1~2 but not 0~2 at cos(0.2) = 0.980
    vectors = torch.stack([angles.cos(), angles.sin()], dim=1).double()[:, None, :]  # (blocks, 1 role, 2)
    assert find_groups(vectors, 0.99) == [2, 1, 1]
    assert find_groups(vectors, 0.97) == [3, 1]
    assert find_groups(vectors, 1.0) == [1, 1, 1, 1]
    assert find_groups(vectors, 0.01) == [4]


def test_loop_direction_sign_and_fit():
    a = torch.tensor([1.0, 2.0, -2.0], dtype=torch.float64)
    vectors = torch.stack([-0.5 * a, 2.0 * a, 3.0 * a])
    direction, scales = loop_direction(vectors)
    assert scales[0] > 0
    torch.testing.assert_close(scales[:, None] * direction, vectors)


def test_folded_model_rebuilds_from_its_config(collinear, inputs):
    folded = fold_model(collinear, 1.0).model
    assert folded.softshare_config["fold"] == {"loops": [[3], [2, 1], [1, 1, 1]]}
    rebuilt = create_model(**json.loads(json.dumps(folded.softshare_config))).double().eval()
    rebuilt.load_state_dict(folded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(inputs), folded(inputs), rtol=0, atol=0)


def test_folded_checkpoint_round_trip(collinear, inputs, tmp_path):
    from softshare.checkpoint import load, save_checkpoint

    folded = fold_model(collinear, 1.0).model
    save_checkpoint(tmp_path / "folded", folded)
    loaded = load(tmp_path / "folded").double()  # load() builds float32: compare at float32 precision
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), folded(inputs), rtol=1e-5, atol=1e-5)


def test_extra_iterations_reuse_the_last_iteration(collinear, inputs):
    folded = fold_model(collinear, 1.0).model
    name, loop = loop_blocks(folded)[0]
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = x
        for t in (0, 1, 2, 2, 2):
            expected = loop.step(expected, t)
        set_iterations(folded, 5)
        assert loop.iterations == 5 and loop_blocks(folded)[3][1].iterations is None  # length-1 loops untouched
        torch.testing.assert_close(loop(x), expected)
        longer = folded(inputs)
        set_iterations(folded, None)
        assert not torch.allclose(longer, folded(inputs))
        set_iterations(folded, {name: 2})
        torch.testing.assert_close(loop(x), loop.step(loop.step(x, 0), 1))
    with pytest.raises(SoftshareError, match="unknown loop"):
        set_iterations(folded, {"stages.9.blocks.1": 3})
    with pytest.raises(SoftshareError, match=">= 1"):
        set_iterations(folded, 0)


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.01])
def test_threshold_outside_unit_interval(collinear, threshold):
    with pytest.raises(SoftshareError, match=r"\(0, 1\]"):
        fold_model(collinear, threshold)


def test_models_that_cannot_fold():
    with pytest.raises(SoftshareError, match="no template banks"):
        fold_model(create_model("wrn_16_1"), 0.9)
    with pytest.raises(SoftshareError, match="nothing is shared"):
        create_model("swrn_10_1_2")  # one block per stage: refused rather than silently unshared
    converted = share(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)), 1)
    blocks = nn.ModuleList([nn.Sequential(converted[1]), nn.Sequential(converted[2])])
    with pytest.raises(SoftshareError, match="not built by softshare.create_model"):
        fold_model(blocks, 0.9)
    with pytest.raises(SoftshareError, match="summing to the 3 shared blocks"):
        create_model("swrn_28_1_2", fold={"loops": [[3], [2], [3]]})


def test_sweep_and_reports(collinear, tmp_path):
    calls = []

    def evaluate(model):
        calls.append(model)
        return {"acc": 0.5 + 0.01 * len(calls), "loss": 1.0}

    rows = sweep(collinear, [1.0, 0.999, 0.5], evaluate)
    assert [row.loops for row in rows[:2]] == [[[3], [2, 1], [1, 1, 1]]] * 2
    assert len(calls) == 2  # 1.0 and 0.999 give the same loops: folded and evaluated once
    assert rows[2].params <= rows[0].params
    paths = write_sweep(rows, tmp_path, sum(p.numel() for p in collinear.parameters()), {"acc": 0.6})
    assert all(p.exists() for p in paths)
    assert "| 0.999 |" in (tmp_path / "fold_sweep.md").read_text()
    result = fold_model(collinear, 1.0)
    write_fold_report(result, tmp_path, source="x", metrics={"original": {"acc": 0.9}, "folded": {"acc": 0.9}})
    report = json.loads((tmp_path / "fold_report.json").read_text())
    assert report["loops"] == [[3], [2, 1], [1, 1, 1]] and report["metrics"]["folded"]["acc"] == 0.9
    assert "1 (not folded)" in (tmp_path / "fold_report.md").read_text()


# -- a second, differently shaped family: the fold core is not SWRN-specific -----------------------
class _ToyBlock(nn.Module):
    """Like the algorithmic nets' block: relu(x + norm2(conv2(relu(norm1(conv1(x)))))), 1-D."""

    def __init__(self, width: int, bank: TemplateBank) -> None:
        super().__init__()
        self.conv1, self.conv2 = SharedConv1d(bank, padding=1), SharedConv1d(bank, padding=1)
        self.norm1, self.norm2 = nn.GroupNorm(2, width), nn.GroupNorm(2, width)

    def forward(self, x):
        return torch.relu(x + self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x))))))


class _ToyLoop(LoopBlock):
    def __init__(self, width: int, length: int) -> None:
        super().__init__(length, ("conv1", "conv2"))
        self.conv1 = nn.Conv1d(width, width, 3, padding=1, bias=False)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1, bias=False)
        self.norm1 = nn.ModuleList(nn.GroupNorm(2, width) for _ in range(length))
        self.norm2 = nn.ModuleList(nn.GroupNorm(2, width) for _ in range(length))

    def step(self, x, t):
        out = torch.relu(self.norm1[t](self.conv1(x) * self.scales["conv1"][t]))
        return torch.relu(x + self.norm2[t](self.conv2(out) * self.scales["conv2"][t]))


class _ToyNet(nn.Module):
    def __init__(self, width: int = 6, depth: int = 4, fold: dict | None = None) -> None:
        super().__init__()
        self.projection = nn.Conv1d(1, width, 3, padding=1)
        if fold is None:
            self.bank = TemplateBank(3, (width, width, 3))
            self.blocks = nn.ModuleList(_ToyBlock(width, self.bank) for _ in range(depth))
        else:
            self.blocks = nn.ModuleList(_ToyLoop(width, n) for n in fold["loops"][0])
        self.head = nn.Conv1d(width, 2, 1)

    def forward(self, x):
        x = self.projection(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _toy_builder(num_classes: int = 2, in_channels: int = 1, fold: dict | None = None) -> nn.Module:
    return _ToyNet(fold=fold)


def test_fold_core_handles_other_block_shapes(monkeypatch):
    from softshare.models import registry

    monkeypatch.setitem(registry._FAMILIES, "fold_toy",
                        registry.ModelFamily("fold_toy", re.compile("fold_toy"), _toy_builder))
    torch.manual_seed(0)
    model = create_model("fold_toy").double().eval()
    with torch.no_grad():
        for first, second, scale in ((0, 1, -0.4), (2, 3, 2.0)):  # blocks 0~1 and 2~3, not 1~2
            for role in ("conv1", "conv2"):
                getattr(model.blocks[second], role).coefficients.copy_(
                    getattr(model.blocks[first], role).coefficients * scale)
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    result = fold_model(model, 1.0)
    assert result.loops == [[2, 2]]
    x = torch.randn(2, 1, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-10, atol=1e-10)


def test_sweep_figure_is_one_axis_in_percent_with_a_sane_range(collinear):
    from softshare.fold.report import sweep_figure

    accuracies = iter([0.9660, 0.9640])
    rows = sweep(collinear, [1.0, 0.5], lambda model: {"acc": next(accuracies)})
    fig = sweep_figure(rows, 1000, {"acc": 0.9665}, "acc")
    assert len(fig.axes) == 1
    low, high = fig.axes[0].get_ylim()
    assert high - low >= 10 and low >= 0 and high <= 100  # one test image is not a cliff
    assert fig.axes[0].get_ylabel() == "accuracy, % (acc)"
    assert {t.get_text() for t in fig.axes[0].texts} == {"1", "0.5"}
