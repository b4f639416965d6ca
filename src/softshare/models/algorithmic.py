"""Per-pixel (mazes, 2-D) and per-bit (prefix sums, 1-D) nets after DeepThinking's recall nets.

The architecture follows ``dt_net_recall_1d/2d`` of aks2203/deep-thinking (Bansal et al. 2022):

    projection   conv(in -> w), ReLU
    iteration    [recall: conv(cat(state, input) -> w), ReLU*] then B residual blocks
                 relu(h + conv2(relu(conv1(h))))                      (B = 2 as there)
    head         [conv(w -> w), ReLU]** conv(w -> w/2), ReLU, conv(w/2 -> classes)

all 3-wide convs without bias. Two options leave DeepThinking's defaults for softshare's first
recurrent body: ``recall_relu=False`` drops the ReLU* after the recall conv (a linear recall) and
``head_convs=2`` the head's first conv**. At width 32 on prefix sums the two together made learning
far more reliable across seeds (docs/algorithmic.md has the measurement). Three bodies differ only in where each iteration's conv weights
come from, so a comparison isolates the sharing:

- ``ff``: distinct weights per iteration (a feed-forward net T iterations deep);
- ``shared``: every conv *role* (recall, conv1, conv2, ... of the iteration) has its own bank of
  k templates that all T iterations mix from (the paper's scheme: one bank per group of layers of
  one shape; the recall conv's shape differs from the others', so one bank for all cannot work);
- ``recurrent``: one iteration's weights, tied, run any number of times.

``lipschitz=True`` is the DT-L remedy for "overthinking" (Bear, Prügel-Bennett & Hare, NeurIPS
2024): inside the iteration every conv is divided by its spectral norm (of the (out, in*kernel)
matrix, as ``torch.nn.utils.spectral_norm`` computes it), ELU replaces ReLU, and each residual
block interpolates ``h <- (1 - g) h + g f(h)`` with a learned gate g in (0, 1) instead of adding.
An iteration is then (approximately) 1-Lipschitz in the state, so the thought settles instead of
growing when the net runs many more iterations than it was trained with.

``grid=True`` (mazes only) runs the net at the maze grid's resolution instead of the image's: a
maze image draws every grid square as a 2x2 block inside a 1-pixel border, so the net averages the
blocks (exact on such images), iterates on a (s + 2)^2 grid instead of a (2s + 6)^2 image (4.8x
fewer pixels at 9x9) where one 3x3 conv reaches a whole grid square further (a path is half as
many steps long), and draws its logits back as 2x2 blocks with a border that is never path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SoftshareError
from ..layers import Conv1d, LoopBlock, SharedConv1d, SharedConv2d, TemplateBank, init_coefficients
from .registry import register_family

BODIES = ("ff", "shared", "recurrent")
RECALL_INITS = ("pytorch", "he", "identity")  # how the recall convs start (AlgorithmicNet._init_recall)
# How a shared net's coefficient rows start: the paper's orthogonal rows (iterations as far apart
# as k allows), or one random unit direction for every iteration plus Gaussian noise of norm
# about coef_noise (iterations start nearly recurrent: a lever of the recurrence study, not the paper's)
COEF_INITS = ("orthogonal", "aligned")
_DIMS = {"maze": 2, "prefix": 1}
_CONV = {1: Conv1d, 2: nn.Conv2d}  # Conv1d: nn.Conv1d that can compute channels-last
_SHARED_CONV = {1: SharedConv1d, 2: SharedConv2d}


def conv_roles(blocks: int, recall: bool) -> tuple[str, ...]:
    """Names of an iteration's convs: ``recall`` (if any), then conv1..conv{2B}."""
    return (("recall",) if recall else ()) + tuple(f"conv{i + 1}" for i in range(2 * blocks))


def _conv(dim: int, in_channels: int, out_channels: int) -> nn.Module:
    return _CONV[dim](in_channels, out_channels, 3, padding=1, bias=False)


def cat_channels(state: Tensor, inputs: Tensor) -> Tensor:
    """``torch.cat([state, inputs], dim=1)`` in the state's layout: torch.cat keeps a 4-D channels-last
    layout but makes 3-D tensors contiguous, which the next (channels-last) 1-D conv would copy back."""
    if state.dim() == 3 and state.stride(1) == 1 and state.size(1) > 1:  # (N, C, L) stored as (N, L, C)
        return torch.cat([state.transpose(1, 2), inputs.transpose(1, 2)], dim=2).transpose(1, 2)
    return torch.cat([state, inputs], dim=1)


def spectral_norm_of(weight: Tensor) -> Tensor:
    """Largest singular value of a conv weight seen as an (out, in * kernel) matrix."""
    return torch.linalg.matrix_norm(weight.flatten(1).float(), ord=2).to(weight.dtype)


class Gates(nn.Module):
    """DT-L's residual interpolation weights g_b = sigmoid(logit_b), one per residual block."""

    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(blocks))

    def forward(self) -> Tensor:
        return torch.sigmoid(self.logits)


class _IterationSteps:
    """The arithmetic of one iteration, shared by `Iteration` and its folded form `LoopIteration`.

    Expects `roles`, `num_blocks`, `lipschitz` and the convs as attributes named by role.
    """

    roles: tuple[str, ...]
    num_blocks: int
    lipschitz: bool
    recall_relu: bool

    def _conv_out(self, role: str, h: Tensor, scales: dict[str, Tensor] | None,
               norms: dict[str, Tensor] | None) -> Tensor:
        out = self._apply_conv(role, h)
        scale = None if scales is None else scales[role]
        if scale is not None:  # W_t = c_t W, and a conv is linear in its weight
            out = out * scale
        if self.lipschitz:  # divide by the spectral norm of the weight actually applied
            sigma = norms[role] if norms is not None else spectral_norm_of(getattr(self, role).weight)
            out = out / (sigma if scale is None else sigma * scale.abs()).clamp_min(1e-12)
        return out

    def _apply_conv(self, role: str, h: Tensor) -> Tensor:
        return getattr(self, role)(h)

    def spectral_norms(self) -> dict[str, Tensor] | None:
        """Per-role spectral norms, to compute once per forward pass (DT-L only)."""
        if not self.lipschitz:
            return None
        return {role: spectral_norm_of(self._weight(role)) for role in self.roles}

    def _weight(self, role: str) -> Tensor:
        return getattr(self, role).weight

    def _step(self, state: Tensor, inputs: Tensor, scales: dict[str, Tensor] | None,
              norms: dict[str, Tensor] | None, gates: Tensor | None) -> Tensor:
        act = F.elu if self.lipschitz else F.relu
        h = state
        if "recall" in self.roles:
            h = self._conv_out("recall", cat_channels(h, inputs), scales, norms)
            h = act(h) if self.recall_relu else h
        for b in range(self.num_blocks):
            out = act(self._conv_out(f"conv{2 * b + 1}", h, scales, norms))
            out = self._conv_out(f"conv{2 * b + 2}", out, scales, norms)
            # relu(h + out), the ReLU in place on the fresh sum: one tensor less per block (~10% of a
            # width-32 prefix-sum step); the same values and gradients (its backward reads the result).
            h = (1 - gates[b]) * h + gates[b] * act(out) if gates is not None else torch.add(h, out).relu_()
        return h


class Iteration(_IterationSteps, nn.Module):
    """One iteration; its convs are direct children named by `conv_roles` (what folding needs)."""

    def __init__(self, dim: int, width: int, in_channels: int, blocks: int, recall: bool, lipschitz: bool,
                 recall_relu: bool, banks: dict[str, TemplateBank] | None = None) -> None:
        super().__init__()
        self.roles = conv_roles(blocks, recall)
        self.num_blocks, self.lipschitz, self.recall_relu = blocks, lipschitz, recall_relu
        for role in self.roles:
            if banks is not None:
                setattr(self, role, _SHARED_CONV[dim](banks[role], padding=1))
            else:
                setattr(self, role, _conv(dim, width + in_channels if role == "recall" else width, width))
        self.gates = Gates(blocks) if lipschitz else None

    def step(self, state: Tensor, inputs: Tensor, t: int | None = None,
             norms: dict[str, Tensor] | None = None) -> Tensor:
        return self._step(state, inputs, None, norms, self.gates() if self.gates is not None else None)


class FixedMixIteration(_IterationSteps):
    """A soft-shared `Iteration` run with its coefficients detached: the templates learn from its
    steps, its own mix does not (`run_on_fixed_mix`). Made afresh for each pass: it mixes each
    role's weight once, on first use, and reuses it for every step of that pass."""

    def __init__(self, iteration: Iteration) -> None:
        self.iteration, self.roles = iteration, iteration.roles
        self.num_blocks, self.lipschitz = iteration.num_blocks, iteration.lipschitz
        self.recall_relu = iteration.recall_relu
        self._mixed: dict[str, Tensor] = {}

    def _weight(self, role: str) -> Tensor:
        if role not in self._mixed:
            layer = getattr(self.iteration, role)
            self._mixed[role] = layer.bank.mix(layer.coefficients.detach())
        return self._mixed[role]

    def _apply_conv(self, role: str, h: Tensor) -> Tensor:
        return getattr(self.iteration, role).convolve(h, self._weight(role))

    def step(self, state: Tensor, inputs: Tensor, t: int | None = None,
             norms: dict[str, Tensor] | None = None) -> Tensor:
        gates = self.iteration.gates
        return self._step(state, inputs, None, norms, gates() if gates is not None else None)


class LoopIteration(_IterationSteps, LoopBlock):
    """A run of n shared iterations folded into one loop (softshare.fold): each conv role once, as
    a plain conv with weight W, with its scales c_t per iteration; DT-L gates per iteration."""

    def __init__(self, dim: int, width: int, in_channels: int, blocks: int, recall: bool, lipschitz: bool,
                 recall_relu: bool, length: int) -> None:
        LoopBlock.__init__(self, length, conv_roles(blocks, recall))
        self.num_blocks, self.lipschitz, self.recall_relu = blocks, lipschitz, recall_relu
        for role in self.roles:
            setattr(self, role, _conv(dim, width + in_channels if role == "recall" else width, width))
        self.gates = nn.ModuleList(Gates(blocks) for _ in range(length)) if lipschitz else None

    def step(self, state: Tensor, inputs: Tensor, t: int | None = None,
             norms: dict[str, Tensor] | None = None) -> Tensor:
        t = min(t or 0, self.length - 1)
        scales = {role: self.scales[role][t] for role in self.roles}
        return self._step(state, inputs, scales, norms, self.gates[t]() if self.gates is not None else None)


class GridToImage(nn.Module):
    """Logits at grid resolution -> the maze image's: each square a 2x2 block, a 1-pixel border of
    "not path" (equal logits, which argmax reads as class 0; the loss masks the border anyway)."""

    def forward(self, logits: Tensor) -> Tensor:
        return F.pad(F.interpolate(logits, scale_factor=2, mode="nearest"), (1, 1, 1, 1))


def image_to_grid(x: Tensor) -> Tensor:
    """A maze image (N, C, 2s + 6, 2s + 6) -> its grid (N, C, s + 2, s + 2): the border cropped, the
    2x2 blocks averaged."""
    side = x.shape[-1]
    if x.dim() != 4 or side % 2 or x.shape[-2] != side or side < 4:
        raise SoftshareError(f"a grid maze net reads square maze images of even side (2 s + 6), "
                             f"got shape {tuple(x.shape)}")
    return F.avg_pool2d(x[..., 1:-1, 1:-1], 2)


class AlgorithmicNet(nn.Module):
    """projection -> `depth` iterations of the body -> head; see the module docstring.

    ``forward(x, iterations)`` runs `iterations` iterations (default `depth`, the trained count).
    ff and (unfolded) shared bodies run at most `depth`; the recurrent body any number; a folded
    shared net whose last block is a loop repeats that loop's last step beyond `depth`, and a net
    with `repeats_last` set (one trained with `run_on`, as evaluated) its last iteration, with
    `repeat_mix_fixed` (`run_on_fixed_mix`) the shared one's coefficients detached in those repeats.
    """

    repeats_last = False  # past its depth, repeat the last iteration (set for run_on: in training and as evaluated)
    repeat_mix_fixed = False  # ... a soft-shared one with its coefficients detached there (run_on_fixed_mix)

    def __init__(self, dim: int, body: str, in_channels: int, num_classes: int = 2, width: int = 32,
                 depth: int = 30, blocks: int = 2, recall: bool = True, num_templates: int | None = None,
                 lipschitz: bool = False, fold: dict | None = None, recall_relu: bool = True,
                 head_convs: int = 3, recall_init: str = "pytorch", coef_init: str = "orthogonal",
                 coef_noise: float = 0.1, grid: bool = False) -> None:
        super().__init__()
        _check_args(body, width, depth, blocks, num_templates, head_convs)
        if grid and dim != 2:
            raise SoftshareError("grid=True reads maze images at their grid's resolution; it applies to the "
                                 "2-D maze nets only")
        if recall_init not in RECALL_INITS:
            raise SoftshareError(f"recall_init must be {' or '.join(RECALL_INITS)}, got {recall_init!r}")
        if coef_init not in COEF_INITS or not (isinstance(coef_noise, (int, float)) and 0 <= coef_noise <= 10):
            raise SoftshareError(f"coef_init must be {' or '.join(COEF_INITS)} and coef_noise a number in [0, 10], "
                                 f"got {coef_init!r}, {coef_noise!r}")
        loops = _fold_loops(fold, body, depth)
        self.dim, self.body, self.depth, self.lipschitz, self.grid = dim, body, depth, lipschitz, grid
        self.projection = _conv(dim, in_channels, width)
        self.banks: nn.ModuleDict | None = None
        args = (dim, width, in_channels, blocks, recall, lipschitz, recall_relu)
        if loops is not None:
            iterations = [LoopIteration(*args, n) for n in loops]
        elif body == "shared":
            shapes = {role: (width, width + in_channels if role == "recall" else width) + (3,) * dim
                      for role in conv_roles(blocks, recall)}
            self.banks = nn.ModuleDict({role: TemplateBank(num_templates, shape) for role, shape in shapes.items()})
            iterations = [Iteration(*args, banks=dict(self.banks)) for _ in range(depth)]
        else:
            iterations = [Iteration(*args) for _ in range(1 if body == "recurrent" else depth)]
        self.iterations = nn.ModuleList(iterations)  # what one step of the schedule runs (recurrent: one)
        wide = [_conv(dim, width, width), nn.ReLU()] if head_convs == 3 else []
        # the grid's upscaling goes last, without parameters: a checkpoint's head.* names stay the same
        self.head = nn.Sequential(*wide, _conv(dim, width, width // 2), nn.ReLU(), _conv(dim, width // 2, num_classes),
                                  *([GridToImage()] if grid else []))
        if self.banks is not None:
            for bank in self.banks.values():
                # PyTorch's default conv init, as the unshared convs here and DeepThinking's.
                bank.reset_parameters(functools.partial(nn.init.kaiming_uniform_, a=math.sqrt(5)))
                init_coefficients(bank.layers)  # orthogonal directions: iterations start apart ...
                with torch.no_grad():  # ... each at the scale of one template (rows of unit norm; k = 1: +1)
                    if coef_init == "aligned":  # ... or one shared random direction plus noise (a study lever)
                        direction = torch.randn(num_templates)
                        for layer in bank.layers:
                            layer.coefficients.copy_(direction / direction.norm()
                                                     + coef_noise * torch.randn(num_templates) / num_templates ** 0.5)
                    for layer in bank.layers:
                        layer.coefficients.div_(layer.coefficients.norm().clamp_min(1e-12))
        if recall_init != "pytorch" and recall and loops is None:
            self._init_recall(recall_init, width)

    @torch.no_grad()
    def _init_recall(self, how: str, width: int) -> None:
        """Start the recall convs otherwise than at PyTorch's default.

        The recall conv is the one conv of an iteration outside a residual branch; at PyTorch's
        default scale it shrinks the state about 2x per iteration (in gradient too), so the first
        of 30 distinct ff iterations gets ~1e-17 of the last one's gradient and never learns.
        "he" (fan-in, ReLU gain) keeps the gradient at one size over depth; a shared net's templates
        get it (a unit-norm coefficient row then gives each layer the same variance). "identity"
        sets the weights on the state's channels to the identity (the input's keep PyTorch's
        default), so that every iteration starts as a residual step and the 30-iteration ff net as a
        plain residual net; the identity *added* to the default weights grew the state ~30x over
        depth and left one of ten probe seeds stuck at 85% (unshared bodies only: a template bank
        has no per-layer identity).
        """
        if how == "he":
            if self.banks is not None:
                self.banks["recall"].reset_parameters(functools.partial(nn.init.kaiming_normal_, nonlinearity="relu"))
            else:
                for iteration in self.iterations:
                    nn.init.kaiming_normal_(iteration.recall.weight, nonlinearity="relu")
            return
        if self.banks is not None:
            raise SoftshareError('recall_init="identity" applies to the ff and recurrent bodies; a shared net\'s '
                                 'layers mix templates, use "he" or "pytorch"')
        for iteration in self.iterations:
            nn.init.dirac_(iteration.recall.weight[:, :width])  # the state's channels; the input's stay

    def iteration_parameters(self) -> list[nn.Parameter]:
        """Parameters of the iterations (DeepThinking's "recur" parameters, which its lr throttle slows)."""
        params = {id(p): p for p in self.iterations.parameters()}
        if self.banks is not None:
            params.update({id(p): p for p in self.banks.parameters()})
        return list(params.values())

    def _loop_tail(self) -> LoopIteration | None:
        last = self.iterations[-1]
        return last if isinstance(last, LoopIteration) and last.length >= 2 else None

    @property
    def max_iterations(self) -> int | None:
        """The most iterations this net can run (None: unbounded)."""
        if self.body == "recurrent" or self._loop_tail() is not None or self.repeats_last:
            return None
        return len(self._schedule(None))

    def check_iterations(self, start: int, count: int) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1 or start < 0:
            raise SoftshareError(f"iterations must be a positive integer (and start >= 0), got {count!r} "
                                 f"from {start!r}")
        most = self.max_iterations
        if most is not None and start + count > most:
            raise SoftshareError(f"this {self.body} net runs at most {most} iterations, got {start + count}; "
                                 "only the recurrent net, or a shared net folded into a loop, runs more")

    def _schedule(self, end: int | None) -> list[tuple[nn.Module, int | None]]:
        """(iteration module, loop step or None) for iterations 0..end-1 (None: the whole schedule).

        Loops run their trained length, or `iterations` after ``set_iterations``; past the end,
        a final loop repeats its last step, and a net with `repeats_last` its last iteration.
        """
        if self.body == "recurrent":
            return [(self.iterations[0], None)] * (end or 1)
        steps: list[tuple[nn.Module, int | None]] = []
        for block in self.iterations:
            if isinstance(block, LoopIteration):
                steps += [(block, min(t, block.length - 1)) for t in range(block.iterations or block.length)]
            else:
                steps.append((block, None))
        tail = self._loop_tail()
        if end is None:
            return steps
        if tail is not None and end > len(steps):
            steps += [(tail, tail.length - 1)] * (end - len(steps))
        elif self.repeats_last and end > len(steps):
            last = steps[-1]
            if self.repeat_mix_fixed and isinstance(last[0], Iteration) and self.banks is not None:
                last = (FixedMixIteration(last[0]), None)
            steps += [last] * (end - len(steps))
        return steps[:end]

    def read(self, x: Tensor) -> Tensor:
        """The input as the iterations see it (a grid net: the maze's grid)."""
        return image_to_grid(x) if self.grid else x

    def embed(self, x: Tensor) -> Tensor:
        """The state before the first iteration."""
        return self._project(self.read(x))

    def _project(self, inputs: Tensor) -> Tensor:
        return F.relu(self.projection(inputs))

    def iterate(self, x: Tensor, count: int, start: int = 0, state: Tensor | None = None) -> Iterator[Tensor]:
        """Yield the state after each of `count` iterations, continuing `state` after `start` ones."""
        self.check_iterations(start, count)
        x = self.read(x)
        if state is None:
            state = self._project(x)
        norms: dict[int, dict[str, Tensor] | None] = {}  # spectral norms once per module and pass
        for block, t in self._schedule(start + count)[start:]:
            if id(block) not in norms:
                norms[id(block)] = block.spectral_norms()
            state = block.step(state, x, t, norms[id(block)])
            yield state

    def forward(self, x: Tensor, iterations: int | None = None, *, start: int = 0, state: Tensor | None = None,
                return_all: bool = False, return_state: bool = False, state_after: int | None = None):
        """Logits (N, classes, *spatial), or with `return_all` (N, iterations, classes, *spatial).

        `start`/`state` continue a run (the progressive loss); `return_state` also returns the
        final state, as ``(logits, state)``; `state_after=t` (1 <= t <= iterations) also returns the
        state after the first t of these iterations, last: ``(logits, [state,] state_t)`` (the
        progressive loss continues from it without running those t iterations again).
        """
        count = self.depth if iterations is None else iterations
        if state_after is not None and not (isinstance(state_after, int) and 1 <= state_after <= count):
            raise SoftshareError(f"state_after must be an integer from 1 to the {count} iterations run, "
                                 f"got {state_after!r}")
        outputs, kept = [], None
        for done, state in enumerate(self.iterate(x, count, start, state), start=1):
            if return_all:
                outputs.append(self.head(state))
            if done == state_after:
                kept = state
        logits = torch.stack(outputs, dim=1) if return_all else self.head(state)
        results = (logits,) + ((state,) if return_state else ()) + ((kept,) if state_after is not None else ())
        return results if len(results) > 1 else logits


def _check_args(body: str, width: int, depth: int, blocks: int, num_templates: int | None, head_convs: int) -> None:
    if body not in BODIES:
        raise SoftshareError(f"unknown body {body!r}; use one of {', '.join(BODIES)}")
    if head_convs not in (2, 3):
        raise SoftshareError(f"head_convs must be 3 (DeepThinking's head) or 2 (without its first w -> w conv), "
                             f"got {head_convs}")
    if width < 2 or depth < 1 or blocks < 1:
        raise SoftshareError(f"width must be >= 2, depth >= 1 and blocks >= 1, got width={width}, "
                             f"depth={depth}, blocks={blocks}")
    if body == "shared":
        if num_templates is None or not 1 <= num_templates <= depth:
            raise SoftshareError(f"each of a shared net's banks feeds {depth} iterations, so num_templates must "
                                 f"be from 1 to {depth}, got {num_templates}")
    elif num_templates is not None:
        raise SoftshareError(f"num_templates applies only to the shared body, not {body!r}")


def _fold_loops(fold: dict | None, body: str, depth: int) -> list[int] | None:
    """Loop lengths of a folded shared net from ``{"loops": [[n1, n2, ...]]}`` (one site: the iterations)."""
    if fold is None:
        return None
    sites = fold.get("loops") if isinstance(fold, dict) else None
    if body != "shared":
        raise SoftshareError(f"only the shared body can be folded into loops, not {body!r}")
    if not (isinstance(sites, list) and len(sites) == 1 and isinstance(sites[0], list)
            and all(isinstance(n, int) and n >= 1 for n in sites[0]) and sum(sites[0]) == depth):
        raise SoftshareError(f"fold must be {{'loops': [[lengths]]}} with positive lengths summing to the "
                             f"depth {depth}, got {fold!r}")
    return sites[0]


def _register(prefix: str, body: str) -> None:
    dim = _DIMS[prefix]
    what = "2-D mazes" if dim == 2 else "1-D prefix sums"
    describe = {"ff": "distinct weights per iteration (feed-forward control)",
                "shared": "every conv role mixes from its own bank of k templates",
                "recurrent": "one iteration's weights, tied (DeepThinking)"}[body]

    def build(num_classes: int = 2, in_channels: int = 3, width: int = 32, depth: int = 30, blocks: int = 2,
              recall: bool = True, num_templates: int | None = 2 if body == "shared" else None,
              lipschitz: bool = False, fold: dict | None = None, recall_relu: bool = True,
              head_convs: int = 3, recall_init: str = "pytorch", coef_init: str = "orthogonal",
              coef_noise: float = 0.1, grid: bool = False) -> AlgorithmicNet:
        return AlgorithmicNet(dim, body, in_channels, num_classes, width, depth, blocks, recall, num_templates,
                              lipschitz, fold, recall_relu, head_convs, recall_init, coef_init, coef_noise, grid)

    name = f"{prefix}_{body}"
    # `iterations` was called `blocks` until softshare 0.1.0 (ambiguous with residual blocks per iteration)
    register_family(name, name, [name], f"{what}: {describe}", small_example=name,
                    input_size=(24, 24) if dim == 2 else (32,), renamed=(("blocks.", "iterations."),))(build)


for _prefix in _DIMS:
    for _body in BODIES:
        _register(_prefix, _body)
