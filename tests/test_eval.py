"""softshare.eval: evaluating a run from its config, and a folded net thinking longer."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import tiny
from softshare import SoftshareError, create_model
from softshare.data.tasks import maze_dataset
from softshare.eval import evaluator_for, exact_match_by_iteration, exact_match_thinking_longer, longest_loop
from softshare.eval.algorithmic import in_trained_layout, think
from softshare.layers import Conv1d


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


class _Scripted(torch.nn.Module):
    """A fake algorithmic net whose prediction per instance and iteration is scripted: state t is
    the logits after iteration t, so the test knows every prediction and confidence in advance."""

    def __init__(self, logits: torch.Tensor) -> None:  # (iterations, N, classes, L)
        super().__init__()
        self.logits = logits

    def iterate(self, x, count):
        for t in range(count):
            yield self.logits[t, : len(x)]

    def head(self, state):
        return state


def _scripted(predictions: list[list[int]], confidence: list[list[float]]) -> torch.Tensor:
    """(iterations, N, 2, 1) logits predicting `predictions[t][n]` with softmax max `confidence[t][n]`."""
    logits = torch.zeros(len(predictions), len(predictions[0]), 2, 1)
    for t, row in enumerate(predictions):
        for n, label in enumerate(row):
            margin = math.log(confidence[t][n] / (1 - confidence[t][n]))
            logits[t, n, label, 0] = margin
    return logits


def test_think_stopping_rules_against_a_scripted_net():
    """Instance 0: wrong twice, then right: the stable rule (patience 2) stops at iteration 5, right.
    Instance 1: right at 2 with high confidence, then wrong and stable: stable stops at 5 (wrong),
    the confident rule picks iteration 2 (right). Instance 2 never settles: the last prediction."""
    y = torch.tensor([[1], [1], [1]])
    predictions = [[0, 0, 0], [0, 1, 1], [1, 0, 0], [1, 0, 1], [1, 0, 0], [1, 0, 1]]
    confidence = [[0.6, 0.6, 0.6], [0.6, 0.99, 0.6], [0.7, 0.6, 0.6], [0.8, 0.6, 0.6], [0.9, 0.6, 0.6],
                  [0.95, 0.7, 0.6]]
    model = _Scripted(_scripted(predictions, confidence))
    x = torch.zeros(3, 1, 1)
    result = think(model, "prefix-sums", x, y, 6, 3, torch.device("cpu"), patience=2)
    assert result["exact_match"] == pytest.approx([0, 2 / 3, 1 / 3, 2 / 3, 1 / 3, 2 / 3])
    stable, confident = result["stop"]["stable"], result["stop"]["confident"]
    # stops: instance 0 at 5 (pred 1 at 3, 4, 5), instance 1 at 5 (0 at 3, 4, 5), instance 2 never: 6
    assert stable["mean_iteration"] == pytest.approx((5 + 5 + 6) / 3)
    assert stable["exact_match"] == pytest.approx(2 / 3)  # 0 right, 1 wrong, 2's last prediction (1) right
    # confident: instance 0 at 6 (0.95, right), instance 1 at 2 (0.99, right), instance 2 at 1 (first 0.6, wrong)
    assert confident["mean_iteration"] == pytest.approx((6 + 2 + 1) / 3)
    assert confident["exact_match"] == pytest.approx(2 / 3)
    with pytest.raises(SoftshareError, match="patience must be a positive integer"):
        think(model, "prefix-sums", x, y, 6, 2, torch.device("cpu"), patience=0)


def test_evaluation_uses_the_trained_layout_with_the_same_results():
    """A run trained channels-last is evaluated channels-last (faster 1-D convs), same numbers."""
    torch.manual_seed(0)
    model = create_model("prefix_shared", num_classes=2, in_channels=1, width=8, depth=4, blocks=1).eval()
    x = torch.rand(3, 1, 40) - 0.5
    before = model(x, return_all=True)
    assert in_trained_layout(model, {"channels_last": False}) is model
    assert not any(m.channels_last for m in model.modules() if isinstance(m, Conv1d))
    in_trained_layout(model, {"channels_last": True})
    assert all(m.channels_last for m in model.modules() if isinstance(m, Conv1d))
    torch.testing.assert_close(model(x, return_all=True), before, atol=1e-5, rtol=1e-4)


def test_until_settled_gives_the_stable_rule_of_the_full_run():
    torch.manual_seed(0)
    net = create_model("prefix_recurrent", in_channels=1, width=8, depth=4, blocks=1)
    x = torch.rand(24, 1, 16).round() - 0.5
    y = torch.randint(0, 2, (24, 16))
    full = think(net, "prefix-sums", x, y, 200, 8, torch.device("cpu"), patience=3)
    cheap = think(net, "prefix-sums", x, y, 200, 8, torch.device("cpu"), patience=3, until_settled=True)
    assert cheap["stop"]["stable"] == full["stop"]["stable"]


def test_thinking_net_folds_a_shared_net_into_a_loop_that_runs_longer():
    from softshare.eval.algorithmic import thinking_net
    torch.manual_seed(0)
    shared = create_model("prefix_shared", in_channels=1, width=4, depth=5, blocks=1, num_templates=1)
    net, loops = thinking_net(shared)
    assert loops == [5] and net.max_iterations is None and shared.max_iterations == 5
    x = torch.rand(3, 1, 8).round() - 0.5
    torch.testing.assert_close(net(x, 5), shared(x, 5))  # the same function within the trained iterations
    assert net(x, 40).shape == shared(x, 5).shape
    recurrent = create_model("prefix_recurrent", in_channels=1, width=4, depth=5, blocks=1)
    assert thinking_net(recurrent) == (recurrent, None)


# -- figures ------------------------------------------------------------------------------------------
def _mazes(count: int, size: int):
    from softshare.data.tasks import generate_mazes

    x, y = generate_mazes(count, size, seed=1)
    x = torch.as_tensor(x).float()
    return x / x.max(), torch.as_tensor(y).long()


def test_the_maze_figure_shows_a_solved_and_an_unsolved_maze_per_size(monkeypatch, tmp_path):
    from softshare.eval import plots

    x, y = _mazes(3, 9)
    predictions = torch.zeros(3, 4, *y.shape[1:], dtype=torch.bool)  # nothing predicted: not solved
    predictions[1, 2:] = y[1].bool()  # maze 1 solved from iteration 3 on
    rows = plots.pick_mazes({9: (x, y)}, {9: predictions}, 4)
    assert [r.label for r in rows] == ["9x9, solved after 4 iterations", "9x9, not solved after 4 iterations"]
    assert torch.equal(rows[0].x, x[1]) and torch.equal(rows[1].x, x[0])
    assert [r.label for r in plots.pick_mazes({9: (x, y)}, {9: predictions}, 1)] == [
        "9x9, not solved after 1 iteration"]  # only one kind there is
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))
    plots.plot_maze_predictions(rows, 1, tmp_path / "m.png")
    (legend,) = figures[0].legends
    assert [t.get_text() for t in legend.get_texts()] == ["start", "goal", "path, predicted", "path, missed",
                                                          "predicted, not the path"]
    assert figures[0].axes[2].get_title() == "prediction, 1 iteration (not solved)"
    assert len(figures[0].axes[0].lines) == 2  # start and goal ringed


def test_accuracy_figure_names_the_net_in_words(monkeypatch, tmp_path):
    from softshare.eval import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))
    result = {"model": "maze_recurrent", "task": "mazes", "train_size": 9, "trained_iterations": 2,
              "iterations": [1, 2, 3], "accuracy": {"9": [0.1, 0.5, 0.6]},
              "stop": {"9": {"stable": {"exact_match": 0.6, "mean_iteration": 3.0}}}}
    plots.plot_accuracy_vs_iterations(result, tmp_path / "p.png")
    ax = figures[0].axes[0]
    assert ax.get_title() == "recurrent net on mazes, trained on 9x9 mazes: thinking longer"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "9x9 mazes", "trained iterations (2)", "where the stopping rule stops (mean)"]
