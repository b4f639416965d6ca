"""Training, resuming and evaluating on the algorithmic tasks through the generic loop and CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny
from softshare import SoftshareError
from softshare.train.algorithmic import AlgorithmicTask, resolve_model_name
from softshare.train.distributed import DistInfo
from softshare.train.optim import build_optimizer
from softshare.train.config import resolve_config
from softshare.train.loop import StopFlag, train


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run) -> dict:
    return load_file(run / "checkpoints" / "last" / "model.safetensors")


def test_task_defaults_are_adam_and_explicit_fields_win():
    config = resolve_config(overrides={"task": "prefix-sums", "lr": 0.01})
    assert (config.optimizer, config.lr, config.train_size) == ("adam", 0.01, 32)
    # DeepThinking's recipe: L2 decay 2e-4, progressive loss alpha 1, 30 iterations, clip 1
    assert (config.weight_decay, config.alpha, config.depth, config.grad_clip) == (2e-4, 1.0, 30, 1.0)
    assert resolve_config().optimizer == "sgd"  # classification keeps the paper's CIFAR recipe
    assert resolve_config("mazes_cpu").task == "mazes"


def test_gpu_presets_build_deepthinkings_body_and_cpu_presets_the_cpu_one():
    """What each preset builds, read off the model and optimizer the trainer makes from it: the
    *_gpu presets DeepThinking's body (ReLU after the recall conv, a 3-conv head; mazes: iteration
    weights throttled to lr / depth, no clipping), the CPU presets a linear recall, a 2-conv head,
    no throttle and clip 1 (docs/algorithmic.md says why)."""
    def built(preset):
        config = resolve_config(preset, overrides={"width": 8, "train_count": 8, "test_count": 2, "batch_size": 4,
                                                    "val_size": 2, "select_size": 0})
        task = AlgorithmicTask(config, torch.device("cpu"), DistInfo())
        model = task.build_model().eval()
        seen = {}  # what the recall conv gave, and what the first residual conv then got
        iteration = model.iterations[0]
        iteration.recall.register_forward_hook(lambda m, args, out: seen.setdefault("recall", out))
        iteration.conv1.register_forward_pre_hook(lambda m, args: seen.setdefault("conv1_in", args[0]))
        with torch.no_grad():
            model(task.train_x[:2], 1)
        assert (seen["recall"] < 0).any()  # so a ReLU would show
        relu_after_recall = torch.equal(seen["conv1_in"], seen["recall"].relu())
        assert relu_after_recall or torch.equal(seen["conv1_in"], seen["recall"])
        head = sum(isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)) for m in model.head)
        scales = sorted({round(g["lr_scale"] * config.depth, 6) for g in build_optimizer(config, model).param_groups})
        return relu_after_recall, head, scales, config.grad_clip

    assert built("prefix_sums_gpu") == (True, 3, [30.0], 1.0)
    assert built("mazes_gpu") == (True, 3, [1.0, 30.0], 0.0)  # iteration weights at lr / 30
    assert built("prefix_sums_cpu") == (False, 2, [30.0], 1.0)
    assert built("mazes_cpu") == (False, 2, [30.0], 1.0)


@pytest.mark.slow  # a few hundred steps of learning: about a minute
def test_tiny_maze_run_learns(tmp_path):
    """Size-9 mazes: loss falls and training exact match leaves the trivial 0% within seconds.

    A CPU test can afford a few hundred steps: enough to fit 48 mazes, far from learning to solve
    mazes in general (that takes thousands of steps; see docs/algorithmic.md).
    """
    config = tiny(tmp_path, model="ff", width=16, depth=8, blocks=1, train_count=48, test_count=16, batch_size=8,
                  epochs=110, lr=3e-3, alpha=0.0, lr_throttle=False, warmup_epochs=0.0, grad_clip=1.0,
                  eval_every=1000, checkpoint_every=1000, name="learn")
    train(config)
    rows = metrics(tmp_path / "learn")
    assert rows[-1]["train_loss"] < 0.3 * rows[0]["train_loss"]
    # predicting "no path" everywhere solves no maze (every maze has a path)
    assert rows[0]["train_acc"] == 0 and max(r["train_acc"] for r in rows[-5:]) >= 0.1, rows[-5:]


class StopAfter(StopFlag):
    """Asks the loop to stop after `steps` training steps, like a SIGTERM would."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        super().__init__()

    @property
    def requested(self) -> bool:
        self.steps -= 1
        return self.steps < 0

    @requested.setter
    def requested(self, value: bool) -> None:
        pass


@pytest.mark.slow  # end-to-end (trains, or runs the CLI in a subprocess): make test-slow
def test_resume_mid_epoch_is_exact(tmp_path):
    """2 epochs straight == stop after 5 steps (mid epoch 2) + resume, with the progressive loss on."""
    straight = tiny(tmp_path, name="straight", alpha=0.5, depth=3)
    train(straight)
    split = tiny(tmp_path, name="split", alpha=0.5, depth=3)
    assert train(split, stop=StopAfter(5)).interrupted
    train(split, resume="auto")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert [r["train_loss"] for r in metrics(tmp_path / "straight")] == \
        pytest.approx([r["train_loss"] for r in metrics(tmp_path / "split")], abs=1e-6)


def test_bad_size_and_count(tmp_path):
    with pytest.raises(SoftshareError, match="odd integer"):
        train(tiny(tmp_path, name="even", train_size=10))
    with pytest.raises(SoftshareError, match="smaller than one step"):
        train(tiny(tmp_path, name="few", train_count=5))


def test_model_names_per_task():
    assert resolve_model_name("mazes", "shared") == "maze_shared"
    assert resolve_model_name("prefix-sums", "prefix_ff") == "prefix_ff"
    with pytest.raises(SoftshareError, match="cannot be trained on prefix-sums"):
        resolve_model_name("prefix-sums", "maze_ff")
    with pytest.raises(SoftshareError, match="cannot be trained on mazes"):
        resolve_model_name("mazes", "wrn_16_4")


@pytest.mark.parametrize("preset", ["prefix_sums_cpu", "mazes_cpu"])
def test_progressive_loss_continues_from_the_full_pass(preset):
    """The progressive loss takes the full pass's state after n iterations instead of running them
    again: the same loss, count and gradients as running the n iterations apart."""
    from softshare.eval.algorithmic import solved
    from softshare.train.algorithmic import AlgorithmicTask, task_loss
    from softshare.train.distributed import DistInfo

    config = resolve_config(preset, overrides={"depth": 4, "width": 8, "train_count": 12, "test_count": 2,
                                                "batch_size": 4})
    task = AlgorithmicTask(config, torch.device("cpu"), DistInfo())
    torch.manual_seed(0)
    model = task.build_model().train()
    batch = next(b for b in task.train_batches(0, 0))._replace(start=2, count=2)

    def apart():  # the computation as written out in the recipe
        with torch.set_grad_enabled(config.alpha < 1):
            logits = model(batch.x, config.depth)
            full, right = task_loss(config.task, logits, batch.y, batch.x), solved(config.task, logits, batch.y, batch.x)
        with torch.no_grad():
            _, state = model(batch.x, batch.start, return_state=True)
        progressive = task_loss(config.task, model(batch.x, batch.count, start=batch.start, state=state),
                                batch.y, batch.x)
        return (1 - config.alpha) * full + config.alpha * progressive, right.sum()

    results = []
    for loss_fn in (apart, lambda: task.loss(model, batch)):
        model.zero_grad(set_to_none=True)
        loss, correct = loss_fn()
        loss.backward()
        results.append((loss.detach(), correct, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_a, correct_a, grads_a), (loss_b, correct_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(correct_a, correct_b)
    assert len(grads_a) == len(grads_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_run_on_lets_the_progressive_passes_end_past_depth_and_needs_them():
    """run_on R: each batch's pass ends at n + k <= T + R (some past T, the loss then runs the last
    iteration again there); without run_on none passes T; without the progressive loss it is refused."""
    from softshare.train.algorithmic import AlgorithmicTask
    from softshare.train.distributed import DistInfo

    def ends(**overrides) -> list[int]:
        config = resolve_config("prefix_sums_cpu", overrides={"model": "shared", "depth": 4, "width": 4,
                                                              "train_count": 400, "test_count": 2, "batch_size": 4,
                                                              **overrides})
        task = AlgorithmicTask(config, torch.device("cpu"), DistInfo())
        return [b.start + b.count for b in task.train_batches(0, 0)]

    plain, longer = ends(run_on=0), ends(run_on=3)
    assert max(plain) == 4 and min(plain) >= 1
    assert max(longer) == 7 and sum(end > 4 for end in longer) > len(longer) / 4
    config = resolve_config("prefix_sums_cpu", overrides={"model": "shared", "depth": 4, "width": 4, "run_on": 3,
                                                          "train_count": 12, "test_count": 2, "batch_size": 4})
    task = AlgorithmicTask(config, torch.device("cpu"), DistInfo())
    batch = next(task.train_batches(0, 0))._replace(start=3, count=3)  # ends at 6, past depth 4
    model = task.build_model()
    assert model.repeats_last and model.max_iterations is None  # so its passes may end past depth
    loss, _ = task.loss(model, batch)
    assert torch.isfinite(loss)
    assert not AlgorithmicTask(resolve_config("prefix_sums_cpu", overrides={"model": "shared", "run_on": 0}),
                               torch.device("cpu"), DistInfo()).build_model().repeats_last
    with pytest.raises(SoftshareError, match="alpha is 0"):
        resolve_config("prefix_sums_cpu", overrides={"model": "ff", "run_on": 3})
    assert model.repeat_mix_fixed  # run_on_fixed_mix (the k >= 2 default): the repeats' coefficients detached
    learned = resolve_config("prefix_sums_cpu", overrides={"model": "shared", "depth": 4, "width": 4, "run_on": 3,
                                                           "run_on_fixed_mix": False})
    assert not AlgorithmicTask(learned, torch.device("cpu"), DistInfo()).build_model().repeat_mix_fixed
    unused = resolve_config("prefix_sums_cpu", overrides={"model": "shared", "run_on": 0, "run_on_fixed_mix": True})
    assert not AlgorithmicTask(unused, torch.device("cpu"), DistInfo()).build_model().repeats_last  # nothing to fix
    ff = resolve_config("prefix_sums_cpu", overrides={"model": "ff", "alpha": 0.5, "run_on": 3,
                                                      "run_on_fixed_mix": True})
    with pytest.raises(SoftshareError, match="has none"):
        AlgorithmicTask(ff, torch.device("cpu"), DistInfo())


def test_best_checkpoint_is_the_one_that_thinks_longest_ties_to_the_later_epoch(tmp_path):
    """With select_size the per-epoch validation scores held-out longer strings at the stable rule
    (every epoch's score in metrics.jsonl); 'best' is the highest (val_extrap_acc, val_acc), and
    among equal epochs the later one."""
    config = tiny(tmp_path, task="prefix-sums", model="shared", num_templates=1, width=8, depth=3, train_size=8,
                  test_sizes=[8], train_count=60, test_count=10, batch_size=20, epochs=3, select_size=16,
                  select_count=12, name="select")
    train(config)
    rows = metrics(tmp_path / "select")
    assert all({"val_extrap_acc", "val_extrap_stop"} <= set(r) for r in rows)
    keys = [(r["val_extrap_acc"], r["val_acc"]) for r in rows]
    best_epoch = max(range(len(keys)), key=lambda i: (keys[i], i)) + 1  # ties: the later epoch
    best = json.loads((tmp_path / "select" / "checkpoints" / "best" / "meta.json").read_text())
    assert best["epoch"] == best_epoch and best["best_metric"] == rows[best_epoch - 1]["val_extrap_acc"]


def test_selection_strings_are_held_out_from_every_test_set():
    from softshare.data.tasks import evaluation_examples, selection_examples
    config = resolve_config("prefix_sums_cpu").to_dict()
    x_val, _ = selection_examples(config, 128, 200)
    x_test, _ = evaluation_examples(config, 128, 1000)
    val, test = {tuple(r) for r in x_val[:, 0].tolist()}, {tuple(r) for r in x_test[:, 0].tolist()}
    assert len(val) == 200 and not val & test
    with pytest.raises(SoftshareError, match="must differ from the training size"):
        selection_examples(config, 32, 10)
    mazes = resolve_config("mazes_cpu").to_dict()
    x_val, _ = selection_examples(mazes, 13, 4)
    x_test, _ = evaluation_examples(mazes, 13, 4)
    assert x_val.shape == x_test.shape and not torch.equal(x_val, x_test)  # the train split at 13, not test


def test_recurrence_weight_anneals_linearly_to_zero():
    from softshare.train.loop import recurrence_weight
    config = resolve_config("prefix_sums_cpu", overrides={"recurrence_reg": 2.0, "recurrence_reg_anneal": 10})
    assert [recurrence_weight(config, e) for e in (0, 5, 10, 20)] == [2.0, 1.0, 0.0, 0.0]
    constant = resolve_config("prefix_sums_cpu", overrides={"recurrence_reg": 2.0})
    assert recurrence_weight(constant, 25) == 2.0


def test_recurrence_weight_starts_late_and_warms_up_linearly():
    from softshare.train.loop import recurrence_weight
    config = resolve_config("prefix_sums_cpu", overrides={"recurrence_reg": 2.0, "recurrence_reg_warmup": 4})
    assert [recurrence_weight(config, e) for e in (0, 1, 2.5, 4, 30)] == [0.0, 0.5, 1.25, 2.0, 2.0]
    both = resolve_config("prefix_sums_cpu", overrides={"recurrence_reg": 2.0, "recurrence_reg_warmup": 4,
                                                        "recurrence_reg_anneal": 8})
    assert [recurrence_weight(both, e) for e in (2, 4, 6, 8)] == [0.75, 1.0, 0.5, 0.0]  # rise x fall
    late = resolve_config("prefix_sums_cpu", overrides={"recurrence_reg": 2.0, "recurrence_reg_start": 10})
    assert [recurrence_weight(late, e) for e in (0, 9.9, 10, 30)] == [0.0, 0.0, 2.0, 2.0]
    ramp = resolve_config("prefix_sums_cpu", overrides={"recurrence_reg": 2.0, "recurrence_reg_start": 10,
                                                        "recurrence_reg_warmup": 4})
    assert [recurrence_weight(ramp, e) for e in (5, 11, 14, 20)] == [0.0, 0.5, 2.0, 2.0]


def test_coefficients_learn_at_their_own_rate():
    """coef_lr_scale multiplies the scheduled lr of the coefficient group only (and composes
    with the throttle); coef_weight_decay decays only them."""
    from softshare.models import create_model
    from softshare.train.optim import build_optimizer
    config = resolve_config("prefix_sums_cpu", overrides={"model": "shared", "coef_lr_scale": 10.0, "depth": 3,
                                                          "coef_weight_decay": 0.5, "lr_throttle": True})
    model = create_model("prefix_shared", in_channels=1, width=4, depth=3, blocks=1, num_templates=2)
    optimizer = build_optimizer(config, model)
    coefficient_ids = {id(layer.coefficients) for it in model.iterations for layer in (it.recall, it.conv1, it.conv2)}
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        if ids <= coefficient_ids:  # iteration parameters: throttled by 1/depth on top
            assert (group["lr_scale"], group["weight_decay"]) == (pytest.approx(10.0 / 3), 0.5)
        else:
            assert not ids & coefficient_ids and group["lr_scale"] in (1.0, pytest.approx(1 / 3))
            assert group["weight_decay"] == config.weight_decay


@pytest.mark.slow  # end-to-end (trains, or runs the CLI in a subprocess): make test-slow
def test_random_starting_states_train_and_resume_exactly(tmp_path):
    """random_state: part of each batch starts from a random thought; the draws come from the
    trainer's seeded RNG, so a run interrupted mid-epoch resumes to the same weights."""
    fields = dict(task="prefix-sums", model="recurrent", width=8, depth=4, train_size=8, test_sizes=[8],
                  train_count=60, test_count=10, batch_size=20, epochs=2, random_state=0.5)
    train(tiny(tmp_path, name="whole", **fields))
    stop = StopFlag()
    calls = {"n": 0}
    import softshare.train.algorithmic as algorithmic
    original = algorithmic.AlgorithmicTask.loss

    def loss_then_stop(self, model, batch):  # stop after the 4th step: mid-epoch 2
        calls["n"] += 1
        if calls["n"] == 4:
            stop.requested = True
        return original(self, model, batch)

    algorithmic.AlgorithmicTask.loss = loss_then_stop
    try:
        assert train(tiny(tmp_path, name="split", **fields), stop=stop).interrupted
    finally:
        algorithmic.AlgorithmicTask.loss = original
    train(tiny(tmp_path, name="split", **fields), resume="auto")
    whole, split = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    plain = tiny(tmp_path, name="plain", **{**fields, "random_state": 0.0})
    train(plain)
    assert not all(torch.equal(whole[k], weights(tmp_path / "plain")[k]) for k in whole)


def test_a_body_brings_its_own_recipe_unless_a_file_or_flag_says_otherwise(tmp_path):
    """`--preset prefix_sums_cpu --model ff` trains the ff body with its own defaults (alpha 0, identity
    recall init, cosine); a flag still wins, and the other bodies keep the preset's."""
    ff = resolve_config("prefix_sums_cpu", overrides={"model": "ff"})
    assert (ff.alpha, ff.recall_init, ff.schedule) == (0.0, "identity", "cosine")
    assert resolve_config("prefix_sums_cpu", overrides={"model": "ff", "alpha": 0.5}).alpha == 0.5
    config_file = tmp_path / "ff.yaml"
    config_file.write_text("preset: prefix_sums_cpu\nmodel: prefix_ff\nschedule: constant\n")
    from_file = resolve_config(config_file=str(config_file))
    assert (from_file.schedule, from_file.alpha) == ("constant", 0.0)
    recurrent = resolve_config("prefix_sums_cpu")
    assert (recurrent.alpha, recurrent.recall_init, recurrent.schedule) == (1.0, "pytorch", "multistep")
    # several templates bring the recurrence regulariser (signed, reach 5) and random starts; one
    # template (already recurrent) only the random starts; the recurrent net neither
    k2 = resolve_config("prefix_sums_cpu", overrides={"model": "shared", "num_templates": 2})
    assert (k2.recurrence_reg, k2.recurrence_reach, k2.recurrence_signed) == (1.0, 5, True)
    assert (k2.random_state, k2.alpha, k2.schedule) == (0.5, 1.0, "multistep")
    assert (recurrent.recurrence_reach, recurrent.recurrence_signed) == (1, False)
    k1 = resolve_config("prefix_sums_cpu", overrides={"model": "shared", "num_templates": 1})
    assert (k1.recurrence_reg, k1.random_state) == (0.0, 0.5)
    assert resolve_config("prefix_sums_cpu", overrides={"model": "shared", "num_templates": 1,
                                                        "random_state": 0.0}).random_state == 0.0
    assert recurrent.random_state == 0.0
    assert resolve_config("prefix_sums_cpu", overrides={"model": "shared", "num_templates": 2,
                                                        "recurrence_reg": 0.0}).recurrence_reg == 0.0
    assert resolve_config("prefix_sums_cpu", overrides={"model": "shared", "num_templates": 1}).recurrence_reg == 0.0


def test_body_defaults_refine_the_task_not_a_presets_own_choices():
    """Width 48 is the recurrent and k = 1 nets' own on prefix sums (the CPU preset, the bare task);
    the feed-forward and k >= 2 nets keep the task's 32; a preset that picks its own width (the GPU
    one: 400) keeps it, while its fields left at the task default still take the body's (ff: alpha 0)."""
    assert resolve_config("prefix_sums_cpu").width == 48
    assert resolve_config(overrides={"task": "prefix-sums", "model": "shared", "num_templates": 1}).width == 48
    assert resolve_config("prefix_sums_cpu", overrides={"model": "shared", "num_templates": 2}).width == 32
    assert resolve_config("prefix_sums_cpu", overrides={"model": "ff"}).width == 32
    assert resolve_config("prefix_sums_cpu", overrides={"width": 32}).width == 32  # a flag wins
    gpu = resolve_config("prefix_sums_gpu")
    assert gpu.width == 400
    gpu_ff = resolve_config("prefix_sums_gpu", overrides={"model": "ff"})
    assert (gpu_ff.width, gpu_ff.alpha) == (400, 0.0)


def test_the_cpu_maze_recipe_trains_a_grid_net_that_eval_rebuilds(tmp_path):
    """mazes_cpu trains at the maze grid's resolution (mazes_gpu at the image's, as DeepThinking);
    the checkpoint remembers it, so `softshare.load` and eval rebuild the same net, whose
    prediction is an image-sized mask at every maze size."""
    import softshare
    from softshare.eval.algorithmic import score_task_checkpoint
    assert resolve_config("mazes_cpu").grid and not resolve_config("mazes_gpu").grid
    assert not resolve_config("prefix_sums_cpu").grid
    config = resolve_config("mazes_cpu", overrides={"width": 4, "depth": 3, "train_count": 20, "test_count": 4,
                                                    "batch_size": 10, "epochs": 1, "val_size": 4, "select_size": 0,
                                                    "out_dir": str(tmp_path), "name": "grid", "device": "cpu"})
    train(config)
    model = softshare.load(tmp_path / "grid" / "checkpoints" / "last")
    assert model.grid
    for size in (9, 13):
        side = 2 * size + 6
        assert model(torch.zeros(1, 3, side, side), 2).shape == (1, 2, side, side)
    result = score_task_checkpoint(tmp_path / "grid", device="cpu", sizes=[9, 13], count=4, iterations=6).result
    assert set(result["test"]) == {"9", "13"}
