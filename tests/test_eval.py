"""softshare.eval: evaluating a run from its config, and a folded net thinking longer."""

from __future__ import annotations

import copy

import math

import pytest
import torch

import softshare.eval.algorithmic as evaluation
from helpers import tiny
from softshare import SoftshareError, create_model, fold_model
from softshare.eval import evaluate_task, evaluator_for
from softshare.eval.algorithmic import in_trained_layout, think
from softshare.layers import Conv1d
from softshare.layers.structure import count_parameters


PREFIX_RUN = {"task": "prefix-sums", "depth": 4, "train_size": 8, "test_sizes": [8, 12], "test_count": 16,
              "train_count": 32, "val_size": None, "seed": 0, "data_root": None, "channels_last": False}


def _labels_from_the_net(monkeypatch, net, iterations_per_size: dict[int, int]):
    """Make the test sets' labels the folded net's own prediction after a chosen iteration count
    per size: its exact-match curve is then known (1 at that count) and checkable by hand."""
    real = evaluation.evaluation_examples
    labelled = {}

    def examples(config, size, count, root=None):
        if size not in labelled:
            x, _ = real(config, size, count, root)
            with torch.no_grad():
                labelled[size] = (x, net(x, iterations_per_size[size]).argmax(dim=1))
        return labelled[size]

    monkeypatch.setattr(evaluation, "evaluation_examples", examples)
    return labelled


def test_a_k1_shared_net_is_folded_and_thinks_longer_than_trained(monkeypatch):
    """k = 1 always folds into one loop, which runs 20x the 4 trained iterations: the curve over 80
    iterations matches the folded net's logits after every iteration (`return_all`), scored apart."""
    torch.manual_seed(0)
    shared = create_model("prefix_shared", num_classes=2, in_channels=1, width=8, depth=4, blocks=1,
                          num_templates=1).eval()
    folded = fold_model(shared, 0.99).model
    data = _labels_from_the_net(monkeypatch, folded, {8: 4, 12: 37})
    result = evaluate_task(shared, PREFIX_RUN).result
    assert result["fold"]["loops"] == [4] and result["fold"]["runs_longer"]
    assert result["fold"]["acc_before"] == result["fold"]["acc_after"] == 1.0  # labels: its own predictions at 4
    assert result["eval_iterations"] == 80 and result["parameters"] == count_parameters(shared)
    x, y = data[12]
    with torch.no_grad():
        every = folded(x, 80, return_all=True).argmax(dim=2)  # (N, iterations, L)
    by_hand = (every == y[:, None]).all(dim=2).float().mean(dim=0).tolist()
    assert result["accuracy"]["12"] == pytest.approx(by_hand)
    assert result["accuracy"]["12"][36] == 1.0 and min(by_hand) < 1.0  # a curve with something to check
    summary = result["test"]["12"]
    assert summary["at_trained"] == pytest.approx(by_hand[3]) and summary["best"] == 1.0
    assert summary["last"] == pytest.approx(by_hand[-1])

    unfolded = evaluate_task(shared, PREFIX_RUN, fold=False).result  # --no-fold: today's behaviour
    assert unfolded["fold"] is None and unfolded["eval_iterations"] == 4
    assert unfolded["accuracy"]["12"] == pytest.approx(by_hand[:4], abs=1e-6)  # folding k = 1 is exact
    longer = evaluate_task(shared, PREFIX_RUN, iterations=50, sizes=[12]).result
    assert list(longer["accuracy"]) == ["12"] and longer["accuracy"]["12"] == pytest.approx(by_hand[:50])


def test_a_net_that_did_not_learn_is_scored_at_its_trained_iterations(monkeypatch):
    torch.manual_seed(0)
    recurrent = create_model("prefix_recurrent", num_classes=2, in_channels=1, width=8, depth=4, blocks=1).eval()
    _labels_from_the_net(monkeypatch, recurrent, {8: 4, 12: 9})
    assert evaluate_task(recurrent, PREFIX_RUN).result["eval_iterations"] == 80  # right at the training size
    monkeypatch.setattr(evaluation, "LEARNED", 1.01)  # now below the bar: no thinking longer
    result = evaluate_task(recurrent, PREFIX_RUN).result
    assert result["eval_iterations"] == 4 and result["fold"] is None


def test_a_slow_net_is_not_cut_short_by_its_score_after_the_trained_iterations(monkeypatch):
    """A net that solves nothing after its 2 trained iterations but everything once its thought
    settles is a slow thinker, not one that did not learn: the gate looks at the stable rule with
    the full budget, as the per-epoch validation that picks the best checkpoint does."""
    torch.manual_seed(0)
    run = {**PREFIX_RUN, "train_size": 48, "depth": 2, "test_sizes": [48]}
    shared = create_model("prefix_shared", num_classes=2, in_channels=1, width=8, depth=2, blocks=1,
                          num_templates=1).eval()
    folded = fold_model(shared, 0.99).model
    _labels_from_the_net(monkeypatch, folded, {48: 40})  # labels: its own settled predictions
    x, y = evaluation.evaluation_examples(run, 48, 16)
    by_hand = think(folded, "prefix-sums", x, y, 40, 100, torch.device("cpu"))
    assert by_hand["exact_match"][1] < evaluation.LEARNED <= by_hand["stop"]["stable"]["exact_match"]
    result = evaluate_task(shared, run).result
    assert result["fold"]["acc_after"] == pytest.approx(by_hand["exact_match"][1])
    assert result["eval_iterations"] == 40  # 20x trained, not cut to 2
    assert result["test"]["48"]["stable"] == pytest.approx(by_hand["stop"]["stable"]["exact_match"])


def test_an_overthinker_is_scored_with_the_full_budget_not_cut_to_its_trained_iterations(monkeypatch):
    """The mirror case: a net that solves everything after its 2 trained iterations and loses it
    when its thought runs on. Cut to 2 iterations its stable rule would read 100%; with the budget
    it reads what the rule really gives."""
    torch.manual_seed(0)
    run = {**PREFIX_RUN, "train_size": 48, "depth": 2, "test_sizes": [48]}
    shared = create_model("prefix_shared", num_classes=2, in_channels=1, width=8, depth=2, blocks=1,
                          num_templates=1).eval()
    folded = fold_model(shared, 0.99).model
    _labels_from_the_net(monkeypatch, folded, {48: 2})  # labels: its predictions after the trained 2
    x, y = evaluation.evaluation_examples(run, 48, 16)
    by_hand = think(folded, "prefix-sums", x, y, 40, 100, torch.device("cpu"))
    assert by_hand["exact_match"][1] == 1.0 and by_hand["stop"]["stable"]["exact_match"] < evaluation.LEARNED
    result = evaluate_task(shared, run).result
    assert result["eval_iterations"] == 40 and result["test"]["48"]["at_trained"] == 1.0
    assert result["test"]["48"]["stable"] == pytest.approx(by_hand["stop"]["stable"]["exact_match"])


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
    net, folded = thinking_net(shared)
    assert folded.loops == [[5]] and net.max_iterations is None and shared.max_iterations == 5
    x = torch.rand(3, 1, 8).round() - 0.5
    torch.testing.assert_close(net(x, 5), shared(x, 5))  # the same function within the trained iterations
    assert net(x, 40).shape == shared(x, 5).shape
    recurrent = create_model("prefix_recurrent", in_channels=1, width=4, depth=5, blocks=1)
    assert thinking_net(recurrent) == (recurrent, None)


def test_a_net_trained_with_run_on_repeats_its_last_iteration_when_evaluated():
    """run_on trained the last iteration past depth, so evaluation runs it there (a marked copy: the
    caller's net is unchanged); without run_on, or with a final loop already, nothing changes."""
    from softshare.eval.algorithmic import repeating_last
    torch.manual_seed(0)
    shared = create_model("prefix_shared", in_channels=1, width=4, depth=3, blocks=1, num_templates=2)
    x = torch.rand(3, 1, 8).round() - 0.5
    assert repeating_last(shared, {"run_on": 0}) is shared
    net = repeating_last(shared, {"run_on": 5})
    assert net.max_iterations is None and shared.max_iterations == 3 and not shared.repeats_last
    trained = copy.deepcopy(shared)
    trained.repeats_last = True  # as training ran it (AlgorithmicTask.build_model with run_on)
    torch.testing.assert_close(net(x, 7), trained(x, 7))
    with pytest.raises(SoftshareError, match="at most 3"):
        shared(x, 7)
    looped, _ = evaluation.thinking_net(create_model("prefix_shared", in_channels=1, width=4, depth=3, blocks=1,
                                                     num_templates=1))
    assert repeating_last(looped, {"run_on": 5}) is looped  # its final loop already runs on
    config = {**PREFIX_RUN, "depth": 3, "run_on": 5}
    result = evaluate_task(shared, config, sizes=[8], count=4, patience=2).result
    assert result["fold"]["repeats_last"] and result["fold"]["runs_longer"]  # (untrained: scored at 3 iterations)


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
    assert figures[0].axes[2].get_title() == "1 iteration: not solved"
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
