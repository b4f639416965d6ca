"""The recurrence study's bookkeeping and the regulariser it measures, without training."""

from __future__ import annotations

import torch

from softshare import create_model, recurrence_penalty
from softshare.recurrence_study import folded_layers, markdown


def _make_collinear(model, stage: int, blocks: list[int]) -> None:
    """Give `blocks` of one stage scaled copies of the first one's conv1/conv2 coefficients."""
    stage_blocks = model.stages[stage].blocks
    with torch.no_grad():
        for role in ("conv1", "conv2"):
            first = getattr(stage_blocks[blocks[0]], role).coefficients
            for scale, b in zip((-2.0, 0.5, 3.0), blocks[1:]):
                getattr(stage_blocks[b], role).coefficients.copy_(scale * first)


def test_folded_layers_counts_layers_in_loops():
    model = create_model("swrn_28_1_4")  # 3 shared blocks (6 shared convs) per stage, k=4 > n: orthogonal rows
    assert folded_layers(model) == (0, 18)
    _make_collinear(model, 0, [1, 2, 3])
    _make_collinear(model, 2, [1, 2])
    assert folded_layers(model) == (6 + 4, 18)


def test_penalty_is_zero_exactly_when_foldable_pairs_are_collinear():
    model = create_model("swrn_22_1_4")  # 2 shared blocks per stage: one foldable pair per role and stage
    assert recurrence_penalty(model).item() > 0.5  # orthonormal start: cos = 0 for every pair
    for stage in range(3):
        _make_collinear(model, stage, [1, 2])
    assert abs(recurrence_penalty(model).item()) < 1e-6
    penalty = recurrence_penalty(create_model("swrn_22_1_4"))
    penalty.backward()  # differentiable: it can be added to the loss


def test_markdown_table_has_a_row_per_run():
    row = {"task": "mazes", "model": "shared", "epochs": 1, "recurrence_reg": 1.0, "accuracy": 0.5,
           "foldable_pair_similarity": 0.9, "layers_folded": 4, "shared_layers": 32, "loops": [[2, 1]],
           "params": 10, "params_folded": 8, "folded_accuracy": 0.4}
    text = markdown({"threshold": 0.99, "hardware": "cpu", "torch": "x", "rows": [row, row]})
    assert text.count("| mazes |") == 2 and "4/32" in text
