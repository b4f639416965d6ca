"""Maze / prefix-sum models: shapes, iterations, return_all, parameter accounting, bad arguments."""

from __future__ import annotations

import pytest
import torch

from softshare import SoftshareError, TemplateBank, create_model

MAZE = torch.rand(2, 3, 24, 24)
BITS = torch.rand(2, 1, 32) - 0.5


def build(name: str, **kwargs):
    in_channels = 3 if name.startswith("maze") else 1
    return create_model(name, num_classes=2, in_channels=in_channels, width=8, depth=3, **kwargs)


@pytest.mark.parametrize("name", ["maze_ff", "maze_shared", "maze_recurrent", "prefix_ff", "prefix_shared",
                                  "prefix_recurrent"])
def test_forward_shapes_and_iterations(name):
    model = build(name).eval()
    x = MAZE if name.startswith("maze") else BITS
    spatial = tuple(x.shape[2:])
    assert model(x).shape == (2, 2, *spatial)
    assert model(x, 2).shape == (2, 2, *spatial)
    every = model(x, return_all=True)
    assert every.shape == (2, 3, 2, *spatial)
    # the last intermediate output is the ordinary output; intermediate ones equal shorter runs
    torch.testing.assert_close(every[:, -1], model(x))
    torch.testing.assert_close(every[:, 1], model(x, 2))


def test_recurrent_runs_more_iterations_than_trained():
    model = build("maze_recurrent", recall=True).eval()
    assert model.max_iterations is None
    every = model(MAZE, 10, return_all=True)
    assert every.shape == (2, 10, 2, 24, 24)
    torch.testing.assert_close(every[:, 6], model(MAZE, 7))


def test_ff_and_shared_refuse_more_iterations_than_depth():
    for name in ("maze_ff", "maze_shared"):
        model = build(name)
        with pytest.raises(SoftshareError, match="at most 3"):
            model(MAZE, 4)
        with pytest.raises(SoftshareError, match=">= 1"):
            model(MAZE, 0)


def test_continuing_a_run_matches_one_run():
    """The progressive loss runs n iterations, then k more from the state: same as n + k at once."""
    for name in ("prefix_shared", "prefix_recurrent"):
        model = build(name).eval()
        _, state = model(BITS, 1, return_state=True)
        torch.testing.assert_close(model(BITS, 2, start=1, state=state), model(BITS, 3))


def test_shared_parameter_count_by_hand():
    w, depth, k, in_channels = 8, 3, 4, 3
    model = create_model("maze_shared", num_classes=2, in_channels=in_channels, width=w, depth=depth,
                         num_templates=k)
    bank = k * w * w * 9
    coefficients = 2 * depth * k
    projection = in_channels * w * 9
    head = w * (w // 2) * 9 + (w // 2) * 2 * 9
    assert sum(p.numel() for p in model.parameters()) == bank + coefficients + projection + head
    banks = {id(m) for m in model.modules() if isinstance(m, TemplateBank)}
    assert len(banks) == 1  # every block's convs draw from ONE bank
    assert [name for name, _ in model.named_children()] == ["projection", "bank", "blocks", "head"]
    for block in model.blocks:
        assert block.conv1.bank is model.bank and block.conv2.bank is model.bank


def test_shared_coefficients_start_orthogonal():
    model = create_model("maze_shared", in_channels=3, width=8, depth=2, num_templates=4)
    rows = torch.stack([layer.coefficients.detach() for layer in model.bank.layers])
    torch.testing.assert_close(rows @ rows.T, torch.eye(4), atol=1e-5, rtol=0)


def test_ff_and_recurrent_parameter_counts():
    w, depth = 8, 3
    shared_rest = 3 * w * 9 + w * (w // 2) * 9 + (w // 2) * 2 * 9
    ff = create_model("maze_ff", num_classes=2, in_channels=3, width=w, depth=depth)
    assert sum(p.numel() for p in ff.parameters()) == shared_rest + 2 * depth * w * w * 9
    rec = create_model("maze_recurrent", num_classes=2, in_channels=3, width=w, depth=depth, recall=True)
    recall = (w + 3) * w * 9
    assert sum(p.numel() for p in rec.parameters()) == shared_rest + 2 * w * w * 9 + recall


@pytest.mark.parametrize("k", [0, 7])
def test_num_templates_range(k):
    with pytest.raises(SoftshareError, match="from 1 to 6"):
        build("maze_shared", num_templates=k)


def test_bad_arguments():
    with pytest.raises(SoftshareError, match="only to the shared body"):
        build("maze_ff", num_templates=2)
    with pytest.raises(SoftshareError, match="only to the recurrent body"):
        build("prefix_shared", recall=True)
    with pytest.raises(SoftshareError, match="width must be"):
        create_model("maze_ff", width=1)


def test_norm_option_keeps_shapes():
    model = build("maze_recurrent", norm=True)
    assert model(MAZE, 5).shape == (2, 2, 24, 24)


def test_shared_net_folds_into_a_loop_that_runs_longer():
    """k = 1: every conv is a multiple of one template, so the blocks fold into one exact loop."""
    from softshare.fold import fold_model, set_iterations

    torch.manual_seed(0)
    model = build("prefix_shared", num_templates=1).eval()
    folded = fold_model(model, 0.99).model
    assert [name for name, _ in folded.named_children()] == ["projection", "blocks", "head"]
    assert len(folded.blocks) == 1 and folded.blocks[0].length == 3
    torch.testing.assert_close(folded(BITS, return_all=True), model(BITS, return_all=True), atol=1e-6, rtol=1e-5)
    set_iterations(folded, 7)
    assert folded.max_iterations == 7 and folded(BITS, 7, return_all=True).shape == (2, 7, 2, 32)
    with pytest.raises(SoftshareError, match="only the shared body"):
        build("prefix_ff", fold={"loops": [[3]]})
    with pytest.raises(SoftshareError, match="summing to the depth 3"):
        build("prefix_shared", fold={"loops": [[1, 1]]})
