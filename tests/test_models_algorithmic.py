"""Maze / prefix-sum models (DeepThinking recall nets): shapes, iterations, parameter counts by hand,
the shared body's banks, DT-L, folding into a loop that runs longer, bad arguments."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from softshare import SoftshareError, TemplateBank, create_model, to_channels_last
from softshare.fold import fold_model, set_iterations
from softshare.models.algorithmic import spectral_norm_of

MAZE = torch.rand(2, 3, 24, 24)
BITS = torch.rand(2, 1, 32) - 0.5


def build(name: str, **kwargs):
    in_channels = 3 if name.startswith("maze") else 1
    return create_model(name, num_classes=2, in_channels=in_channels, **{"width": 8, "depth": 3, **kwargs})


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["maze_ff", "maze_shared", "maze_recurrent", "prefix_ff", "prefix_shared",
                                  "prefix_recurrent"])
@pytest.mark.parametrize("lipschitz", [False, True])
def test_forward_shapes_and_iterations(name, lipschitz):
    model = build(name, lipschitz=lipschitz).eval()
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
    model = build("maze_recurrent").eval()
    assert model.max_iterations is None
    every = model(MAZE, 10, return_all=True)
    assert every.shape == (2, 10, 2, 24, 24)
    torch.testing.assert_close(every[:, 6], model(MAZE, 7))


@pytest.mark.parametrize("name", ["prefix_ff", "prefix_shared"])
def test_repeats_last_runs_the_last_iteration_again_past_depth(name):
    """`repeats_last` (run_on, in training and as evaluated): iterations past depth repeat the last
    one, step by step as written out; within depth it changes nothing."""
    plain = build(name).eval()
    model = copy.deepcopy(plain)
    model.repeats_last = True
    assert plain.max_iterations == 3 and model.max_iterations is None
    torch.testing.assert_close(model(BITS, 3), plain(BITS))
    state = list(plain.iterate(BITS, 3))[-1]
    last = plain.iterations[-1]
    for _ in range(2):
        state = last.step(state, BITS, None, last.spectral_norms())
    torch.testing.assert_close(model(BITS, 5), plain.head(state))
    _, middle = model(BITS, 2, return_state=True)  # continued from a state, as the progressive loss does
    torch.testing.assert_close(model(BITS, 3, start=2, state=middle), plain.head(state))


def test_repeat_mix_fixed_detaches_only_the_repeats_coefficients():
    """`repeat_mix_fixed` (run_on_fixed_mix): past depth the last iteration runs with its weights mixed
    from detached coefficients. Same outputs; the templates get the same gradient; the last layer's
    coefficients get only the gradient of their use within depth, computed here with the repeats'
    weights as constants."""
    plain = build("prefix_shared").train()
    fixed = copy.deepcopy(plain)
    plain.repeats_last = fixed.repeats_last = True
    fixed.repeat_mix_fixed = True
    torch.testing.assert_close(fixed(BITS, 6), plain(BITS, 6))
    plain(BITS, 6).square().sum().backward()
    fixed(BITS, 6).square().sum().backward()
    last_plain, last_fixed = plain.iterations[-1], fixed.iterations[-1]
    for role in last_plain.roles:
        torch.testing.assert_close(fixed.banks[role].templates.grad, plain.banks[role].templates.grad)
        assert not torch.allclose(getattr(last_fixed, role).coefficients.grad,
                                  getattr(last_plain, role).coefficients.grad)
    # independently: the repeats as plain convs with constant weights; only depth's use is differentiated
    manual = copy.deepcopy(plain)
    manual.zero_grad()
    manual.repeats_last = False
    state = list(manual.iterate(BITS, 3))[-1]
    last = manual.iterations[-1]
    weights = {role: getattr(last, role).weight.detach() for role in last.roles}
    for _ in range(3):
        h = F.conv1d(torch.cat([state, BITS], 1), weights["recall"], padding=1)
        h = F.relu(h) if last.recall_relu else h
        for b in range(last.num_blocks):
            out = F.conv1d(F.relu(F.conv1d(h, weights[f"conv{2 * b + 1}"], padding=1)), weights[f"conv{2 * b + 2}"],
                           padding=1)
            h = F.relu(h + out)
        state = h
    manual.head(state).square().sum().backward()
    for role in last.roles:
        torch.testing.assert_close(getattr(last_fixed, role).coefficients.grad, getattr(last, role).coefficients.grad)
    fixed.eval()
    torch.testing.assert_close(fixed(BITS, 6), plain.eval()(BITS, 6))  # evaluated alike


def test_ff_and_shared_refuse_more_iterations_than_depth():
    for name in ("maze_ff", "maze_shared"):
        model = build(name)
        with pytest.raises(SoftshareError, match="at most 3"):
            model(MAZE, 4)
        for bad in (0, -2, 2.5, True):
            with pytest.raises(SoftshareError, match="positive integer"):
                model(MAZE, bad)


def test_continuing_a_run_matches_one_run():
    """The progressive loss runs n iterations, then k more from the state: same as n + k at once."""
    for name in ("prefix_ff", "prefix_shared", "prefix_recurrent"):
        model = build(name).eval()
        _, state = model(BITS, 1, return_state=True)
        torch.testing.assert_close(model(BITS, 2, start=1, state=state), model(BITS, 3))


def test_state_after_returns_the_state_of_a_shorter_run():
    for name in ("prefix_recurrent", "maze_shared"):
        model = build(name).eval()
        x = BITS if name.startswith("prefix") else MAZE
        logits, kept = model(x, 3, state_after=1)
        torch.testing.assert_close(logits, model(x, 3))
        torch.testing.assert_close(kept, model(x, 1, return_state=True)[1])
        _, final, kept = model(x, 3, return_state=True, state_after=3)
        assert kept is final
        for bad in (0, 4, 1.5):
            with pytest.raises(SoftshareError, match="state_after"):
                model(x, 3, state_after=bad)


@pytest.mark.parametrize("name", ["prefix_ff", "prefix_shared", "prefix_recurrent", "maze_recurrent"])
@pytest.mark.parametrize("lipschitz", [False, True])
def test_channels_last_computes_the_same(name, lipschitz):
    """to_channels_last: 1-D nets compute their convs as channels-last 2-D ones, with the same results."""
    torch.manual_seed(0)
    model = build(name, lipschitz=lipschitz).double()
    fast = to_channels_last(copy.deepcopy(model))
    x = (BITS if name.startswith("prefix") else MAZE).double()
    fast_x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    out, fast_out = model(x, return_all=True), fast(fast_x, return_all=True)
    torch.testing.assert_close(fast_out, out, rtol=1e-9, atol=1e-9)
    fast_out.square().sum().backward()
    out.square().sum().backward()
    for (label, p), q in zip(model.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-9, msg=label)
    if name.startswith("prefix"):
        _, state = fast(fast_x, return_state=True)
        assert state.stride(1) == 1  # the thought stays channels-last from iteration to iteration


# Parameter counts by hand: 3-wide convs without bias, w = 8, one input channel (prefix sums) or 3.
def _pieces(w: int, c: int, taps: int, blocks: int, recall: bool) -> tuple[int, int, int]:
    projection = c * w * taps
    iteration = (w + c) * w * taps * recall + 2 * blocks * w * w * taps
    head = w * w * taps + w * (w // 2) * taps + (w // 2) * 2 * taps  # w -> w -> w/2 -> 2, as DeepThinking
    return projection, iteration, head


@pytest.mark.parametrize("blocks,recall", [(2, True), (1, True), (2, False)])
def test_parameter_counts_by_hand(blocks, recall):
    w, depth, c, taps = 8, 3, 1, 3
    projection, iteration, head = _pieces(w, c, taps, blocks, recall)
    kw = dict(blocks=blocks, recall=recall)
    assert count(build("prefix_recurrent", **kw)) == projection + iteration + head
    assert count(build("prefix_ff", **kw)) == projection + depth * iteration + head
    k = 2
    roles = 2 * blocks + recall
    assert count(build("prefix_shared", num_templates=k, **kw)) == projection + k * iteration + depth * roles * k + head
    # DT-L adds one gate per residual block per iteration (one set for the recurrent body)
    assert count(build("prefix_recurrent", lipschitz=True, **kw)) == projection + iteration + head + blocks
    assert count(build("prefix_ff", lipschitz=True, **kw)) == projection + depth * (iteration + blocks) + head
    # head_convs=2 drops the head's w -> w conv; the linear recall has no parameters to drop
    short = dict(kw, head_convs=2, recall_relu=False)
    assert count(build("prefix_recurrent", **short)) == projection + iteration + head - w * w * taps
    assert count(build("prefix_shared", num_templates=k, **short)) == (projection + k * iteration + depth * roles * k
                                                                       + head - w * w * taps)


def test_cpu_prefix_recipe_net_counts_by_hand():
    """The prefix_sums_cpu body (w 32, T 30, B 1, linear recall, 2-conv head) counted by hand:
    projection 1*32*3, recall 33*32*3, one block 2*32*32*3, head 32*16*3 + 16*2*3."""
    net = create_model("prefix_recurrent", num_classes=2, in_channels=1, width=32, depth=30, blocks=1, recall_relu=False,
                       head_convs=2)
    assert count(net) == 96 + 3168 + 6144 + 1536 + 96 == 11040
    with pytest.raises(SoftshareError, match="head_convs must be 3"):
        create_model("prefix_recurrent", in_channels=1, head_convs=1)


def test_maze_recurrent_count_by_hand():
    w, c, taps = 8, 3, 9
    projection, iteration, head = _pieces(w, c, taps, 2, True)
    assert count(build("maze_recurrent")) == projection + iteration + head == 3 * 72 + (11 * 72 + 4 * 576) + (576 + 288 + 72) == 4248


def test_shared_body_has_one_bank_per_conv_role():
    model = build("prefix_shared", num_templates=2)
    assert list(model.banks) == ["recall", "conv1", "conv2", "conv3", "conv4"]
    assert model.banks["recall"].weight_shape == (8, 9, 3) and model.banks["conv1"].weight_shape == (8, 8, 3)
    assert len({id(m) for m in model.modules() if isinstance(m, TemplateBank)}) == 5
    for role, bank in model.banks.items():
        assert [layer for layer in bank.layers] == [getattr(it, role) for it in model.iterations]


def test_shared_coefficients_start_orthogonal_at_unit_norm():
    model = build("prefix_shared", depth=3, num_templates=3)
    for bank in model.banks.values():
        rows = torch.stack([layer.coefficients.detach() for layer in bank.layers])
        torch.testing.assert_close(rows @ rows.T, torch.eye(3), atol=1e-5, rtol=0)
    signs = set()  # k >= 2: the rows as orthogonal_ draws them, signs and all
    for seed in range(5):
        torch.manual_seed(seed)
        signs |= {float(layer.coefficients.detach()[0].sign())
                  for layer in build("prefix_shared", depth=3).banks["conv1"].layers}
    assert signs == {-1.0, 1.0}


def test_k1_shared_net_starts_as_the_recurrent_net():
    """k = 1: every iteration's conv of a role is +1 x its template (no random signs), so the
    shared net computes exactly what a recurrent net with those templates as weights does."""
    torch.manual_seed(0)
    shared = build("prefix_shared", num_templates=1, blocks=1).eval()
    recurrent = build("prefix_recurrent", blocks=1).eval()
    with torch.no_grad():
        for role, bank in shared.banks.items():
            assert all(layer.coefficients.item() == pytest.approx(1.0) for layer in bank.layers)
            getattr(recurrent.iterations[0], role).weight.copy_(bank.templates[0])
        recurrent.projection.weight.copy_(shared.projection.weight)
        for a, b in zip(recurrent.head.parameters(), shared.head.parameters()):
            a.copy_(b)
    torch.testing.assert_close(shared(BITS, return_all=True), recurrent(BITS, 3, return_all=True))


def test_spectral_norm_of_matches_numpy_svd():
    weight = torch.randn(8, 9, 3)
    expected = np.linalg.svd(weight.reshape(8, 27).numpy().astype(np.float64), compute_uv=False)[0]
    assert spectral_norm_of(weight).item() == pytest.approx(expected, rel=1e-5)


def test_dt_l_divides_every_iteration_conv_by_its_spectral_norm():
    """Scaling an iteration's conv weight does not change a DT-L net: W / sigma(W) is scale-free."""
    torch.manual_seed(0)
    model = build("prefix_recurrent", lipschitz=True).eval()
    before = model(BITS, 20)
    with torch.no_grad():
        model.iterations[0].conv2.weight.mul_(7.0)
        model.iterations[0].recall.weight.mul_(0.1)
    torch.testing.assert_close(model(BITS, 20), before)
    plain = build("prefix_recurrent").eval()
    reference = plain(BITS, 20)
    with torch.no_grad():
        plain.iterations[0].conv2.weight.mul_(7.0)
    assert not torch.allclose(plain(BITS, 20), reference)


def test_dt_l_thoughts_stay_bounded_where_plain_ones_grow():
    """Many more iterations than trained: the DT-L state stays on its scale, the plain one need not."""
    torch.manual_seed(0)
    x = torch.rand(4, 1, 64) - 0.5

    def expanding(lipschitz: bool):  # the same weights, 4x: an iteration that expands without the remedy
        torch.manual_seed(1)
        model = build("prefix_recurrent", width=16, lipschitz=lipschitz).eval()
        with torch.no_grad():
            for conv in ("conv1", "conv2", "conv3", "conv4"):
                getattr(model.iterations[0], conv).weight.mul_(4.0)
        return model

    with torch.no_grad():
        dtl = [s.abs().max().item() for s in expanding(True).iterate(x, 400)]
        plain = [s.abs().max().item() for s in expanding(False).iterate(x, 60)]
    assert np.isfinite(dtl).all() and max(dtl) < 10 * max(dtl[:30])
    assert plain[-1] > 100 * plain[5] or not np.isfinite(plain[-1])


def test_linear_recall_computed_by_hand():
    """recall_relu=False: state <- block(recall_conv(cat(state, x))) with no ReLU between; the
    default applies DeepThinking's ReLU there. One iteration of a recurrent net, computed with F.conv1d."""
    torch.manual_seed(0)
    F = torch.nn.functional
    for recall_relu in (True, False):
        model = build("prefix_recurrent", blocks=1, recall_relu=recall_relu).eval()
        it = model.iterations[0]
        h = F.relu(F.conv1d(BITS, model.projection.weight, padding=1))
        r = F.conv1d(torch.cat([h, BITS], 1), it.recall.weight, padding=1)
        r = F.relu(r) if recall_relu else r
        h = F.relu(r + F.conv1d(F.relu(F.conv1d(r, it.conv1.weight, padding=1)), it.conv2.weight, padding=1))
        torch.testing.assert_close(model(BITS, 1), model.head(h))
        assert (r < 0).any() != recall_relu  # the two forms really differ on this input
    shared = build("prefix_shared", num_templates=1, recall_relu=False).eval()
    folded = fold_model(shared, 0.99).model  # the folded loop keeps the linear recall
    torch.testing.assert_close(folded(BITS, return_all=True), shared(BITS, return_all=True), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(folded(BITS), _with_recall_relu(folded)(BITS))


def _with_recall_relu(model):
    other = copy.deepcopy(model)
    for iteration in other.iterations:
        iteration.recall_relu = True
    return other


@pytest.mark.parametrize("k", [0, 4])
def test_num_templates_range(k):
    with pytest.raises(SoftshareError, match="from 1 to 3"):
        build("maze_shared", num_templates=k)


def test_bad_arguments():
    with pytest.raises(SoftshareError, match="only to the shared body"):
        build("maze_ff", num_templates=2)
    with pytest.raises(SoftshareError, match="width must be"):
        create_model("maze_ff", width=1)
    with pytest.raises(SoftshareError, match="blocks >= 1"):
        build("prefix_recurrent", blocks=0)


@pytest.mark.parametrize("lipschitz", [False, True])
def test_shared_net_folds_into_a_loop_that_runs_longer(lipschitz):
    """k = 1: every conv of a role is a multiple of one template, so the iterations fold into one
    exact loop, which then runs any number of iterations."""
    torch.manual_seed(0)
    model = build("prefix_shared", num_templates=1, lipschitz=lipschitz).eval()
    result = fold_model(model, 0.99)
    folded = result.model
    assert result.loops == [[3]] and [name for name, _ in folded.named_children()] == ["projection", "iterations", "head"]
    assert count(folded) < count(build("prefix_ff", lipschitz=lipschitz))
    torch.testing.assert_close(folded(BITS, return_all=True), model(BITS, return_all=True), atol=1e-6, rtol=1e-5)
    assert folded.max_iterations is None
    longer = folded(BITS, 9, return_all=True)
    assert longer.shape == (2, 9, 2, 32)
    torch.testing.assert_close(longer[:, :3], model(BITS, return_all=True), atol=1e-6, rtol=1e-5)
    set_iterations(folded, 5)  # the explicit form still works: the loop runs 5 times, then repeats its last step
    torch.testing.assert_close(folded(BITS, 9), longer[:, -1], atol=1e-6, rtol=1e-5)
    with pytest.raises(SoftshareError, match="only the shared body"):
        build("prefix_ff", fold={"loops": [[3]]})
    with pytest.raises(SoftshareError, match="summing to the depth 3"):
        build("prefix_shared", fold={"loops": [[1, 1]]})


def test_shared_net_with_distinct_iterations_does_not_run_longer():
    torch.manual_seed(0)
    model = build("prefix_shared", num_templates=3).eval()  # orthogonal coefficients: nothing folds
    result = fold_model(model, 0.99)
    assert result.loops == [[1, 1, 1]] and result.model.max_iterations == 3
    torch.testing.assert_close(result.model(BITS), model(BITS), atol=1e-6, rtol=1e-5)
    with pytest.raises(SoftshareError, match="at most 3"):
        result.model(BITS, 4)


def test_he_recall_init_carries_the_gradient_to_the_first_ff_iteration():
    """PyTorch's default scale shrinks the state ~2x per iteration through the (non-residual)
    recall conv: the first of 30 ff iterations gets a vanishing gradient. He's scale keeps it."""
    x = torch.rand(16, 1, 32).round() - 0.5
    y = torch.randint(0, 2, (16, 32))

    def first_to_last(recall_init: str) -> float:
        torch.manual_seed(0)
        net = build("prefix_ff", width=16, depth=30, blocks=1, recall_relu=False, head_convs=2,
                    recall_init=recall_init)
        states = []
        for state in net.iterate(x, 30):
            state.retain_grad()
            states.append(state)
        torch.nn.functional.cross_entropy(net.head(states[-1]), y).backward()
        return float(states[0].grad.norm() / states[-1].grad.norm())

    assert first_to_last("pytorch") < 1e-6
    assert 0.1 < first_to_last("he") < 10
    assert 0.1 < first_to_last("identity") < 10
    with pytest.raises(SoftshareError, match="recall_init"):
        build("prefix_ff", recall_init="xavier")


def test_identity_recall_init_passes_the_state_and_keeps_the_default_on_the_input():
    """recall_init='identity': the state's channels map 1:1 (kernel centre, state channel c ->
    output c, nothing else), the input channel keeps PyTorch's default weights. A template bank
    has no identity."""
    nets = {}
    for init in ("pytorch", "identity"):
        torch.manual_seed(0)
        nets[init] = build("prefix_ff", width=8, depth=3, blocks=1, recall_init=init)
    for plain, with_identity in zip(nets["pytorch"].iterations, nets["identity"].iterations):
        weight = with_identity.recall.weight.detach()
        expected = torch.zeros(8, 8, 3)
        expected[range(8), range(8), 1] = 1.0
        torch.testing.assert_close(weight[:, :8], expected)
        torch.testing.assert_close(weight[:, 8:], plain.recall.weight.detach()[:, 8:])
        state = torch.randn(2, 8, 16)  # convolving the state alone gives the state back
        torch.testing.assert_close(torch.nn.functional.conv1d(state, weight[:, :8], padding=1), state)
    with pytest.raises(SoftshareError, match="identity"):
        build("prefix_shared", num_templates=2, recall_init="identity")


def test_aligned_coefficients_start_nearly_recurrent():
    """coef_init='aligned': every iteration's row is one unit direction plus noise of norm ~coef_noise."""
    from softshare.analysis import abs_cosine
    torch.manual_seed(0)
    net = build("prefix_shared", width=4, depth=30, blocks=1, num_templates=2, coef_init="aligned", coef_noise=0.1)
    rows = torch.stack([it.conv1.coefficients.detach() for it in net.iterations])
    assert torch.allclose(rows.norm(dim=1), torch.ones(30))
    assert abs_cosine(rows).min() > 0.9
    torch.manual_seed(0)
    paper = build("prefix_shared", width=4, depth=30, blocks=1, num_templates=2)
    assert abs_cosine(torch.stack([it.conv1.coefficients.detach() for it in paper.iterations])).min() < 0.5


def test_grid_net_is_the_image_net_run_on_the_maze_grid():
    """A grid net reads a maze at one pixel per 2x2 block: its logits are the same weights' logits
    on the grid, drawn back as 2x2 blocks inside a 1-pixel border of ties (read as "not path")."""
    from softshare.data.tasks.mazes import generate_mazes
    from softshare.models.algorithmic import image_to_grid
    x, _ = generate_mazes(3, 9, seed=4)
    image = torch.from_numpy(x).float()
    grid = image_to_grid(image)
    assert grid.shape == (3, 3, 11, 11)  # s + 2 squares a side
    # the blocks are exact: drawing the grid back as 2x2 blocks inside a black border gives the image
    redrawn = torch.nn.functional.pad(grid.repeat_interleave(2, -1).repeat_interleave(2, -2), (1, 1, 1, 1))
    assert torch.equal(redrawn, image)
    plain = build("maze_recurrent").eval()
    gridded = build("maze_recurrent", grid=True).eval()
    assert count(gridded) == count(plain)  # no parameter of its own
    gridded.load_state_dict(plain.state_dict())
    on_grid = plain(grid, 5)
    out = gridded(image, 5)
    assert out.shape == (3, 2, 24, 24)
    torch.testing.assert_close(out[:, :, 1:-1, 1:-1], on_grid.repeat_interleave(2, -1).repeat_interleave(2, -2))
    assert (out[:, :, 0] == 0).all() and (out[:, :, :, -1] == 0).all()
    assert (out.argmax(1)[:, 0] == 0).all()  # the border reads as "not path"


def test_grid_applies_to_maze_images_only():
    with pytest.raises(SoftshareError, match="2-D maze nets only"):
        build("prefix_recurrent", grid=True)
    with pytest.raises(SoftshareError, match="even side"):
        build("maze_recurrent", grid=True)(torch.rand(1, 3, 25, 25))
