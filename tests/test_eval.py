"""softshare.eval: evaluating a run from its config, and a folded net thinking longer."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny
from softshare import SoftshareError, create_model
from softshare.data.tasks import maze_dataset
from softshare.eval import evaluator_for, exact_match_by_iteration, exact_match_thinking_longer, longest_loop


def folded_maze_net(loops: list[int]):
    torch.manual_seed(0)
    return create_model("maze_shared", width=4, depth=sum(loops), num_templates=2, fold={"loops": [loops]})


def test_longest_loop_is_the_last_of_the_longest():
    name, loop = longest_loop(folded_maze_net([2, 1, 2]))
    assert name == "blocks.2" and loop.length == 2
    assert longest_loop(folded_maze_net([1, 1])) is None


def test_thinking_longer_runs_only_the_longest_loop_longer_then_restores_it():
    model = folded_maze_net([2, 1])
    x, y = maze_dataset(9, 4, seed=0)
    cpu = torch.device("cpu")
    curve = exact_match_thinking_longer(model, "mazes", x, y, 2, 2, cpu)
    assert len(curve) == 3 + 2 and model.max_iterations == 3  # trained schedule restored
    assert curve[:2] == exact_match_by_iteration(model, "mazes", x, y, 2, 2, cpu)  # the loop comes first
    assert exact_match_thinking_longer(folded_maze_net([1, 1]), "mazes", x, y, 2, 2, cpu) is None


def test_evaluator_for_an_algorithmic_run(tmp_path):
    config = tiny(tmp_path).to_dict()
    evaluate = evaluator_for(config, "cpu")
    assert 0 <= evaluate(create_model("maze_recurrent", width=4, depth=2))["acc"] <= 1
    with pytest.raises(SoftshareError, match="evaluate it with --data mazes"):
        evaluator_for(config, "cpu", dataset="cifar10")


def test_evaluator_for_a_classifier_needs_a_dataset():
    with pytest.raises(SoftshareError, match="does not record its dataset"):
        evaluator_for({"task": "classification"}, "cpu")
