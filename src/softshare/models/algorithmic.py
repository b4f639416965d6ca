"""Per-pixel (mazes, 2-D) and per-bit (prefix sums, 1-D) nets for the algorithmic tasks.

One family, three bodies between the same projection and head, so a comparison isolates the
body: ``ff`` (D distinct residual blocks), ``shared`` (the same D blocks mixing all their
convs from ONE bank of k templates: the paper's scheme, and the shape ``fold`` can loop) and
``recurrent`` (one block applied T times with tied weights, optionally with recall: the
easy-to-hard baseline of Bansal et al., 2022). Every body exposes its intermediate states, so
an accuracy-vs-iterations curve costs one pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SoftshareError
from ..layers import LoopBlock, SharedConv1d, SharedConv2d, TemplateBank, init_coefficients
from .registry import register_family

BODIES = ("ff", "shared", "recurrent")
_DIMS = {"maze": 2, "prefix": 1}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_SHARED_CONV = {1: SharedConv1d, 2: SharedConv2d}


def _conv(dim: int, in_channels: int, out_channels: int) -> nn.Module:
    return _CONV[dim](in_channels, out_channels, 3, padding=1, bias=False)


def _norm(width: int, norm: bool) -> nn.Module:
    return nn.GroupNorm(math.gcd(4, width), width) if norm else nn.Identity()


class ResidualBlock(nn.Module):
    """relu(x + conv2(relu(conv1(x)))): the block of Bansal et al., without BatchNorm by default.

    BatchNorm statistics are per-depth, which breaks running a block more times than trained,
    so the optional normalisation is GroupNorm (per instance, independent of image size).
    With `bank`, both convs mix their weights from it.
    """

    def __init__(self, dim: int, width: int, bank: TemplateBank | None = None, norm: bool = False) -> None:
        super().__init__()
        if bank is None:
            self.conv1, self.conv2 = _conv(dim, width, width), _conv(dim, width, width)
        else:
            self.conv1 = _SHARED_CONV[dim](bank, padding=1)
            self.conv2 = _SHARED_CONV[dim](bank, padding=1)
        self.norm1, self.norm2 = _norm(width, norm), _norm(width, norm)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(x + self.norm2(self.conv2(out)))


class LoopResidualBlock(LoopBlock):
    """Shared residual blocks folded into one loop (softshare.fold): both convs once, the
    normalisation layers and the scales c_t per iteration."""

    def __init__(self, dim: int, width: int, length: int, norm: bool) -> None:
        super().__init__(length, ("conv1", "conv2"))
        self.conv1, self.conv2 = _conv(dim, width, width), _conv(dim, width, width)
        self.norm1 = nn.ModuleList(_norm(width, norm) for _ in range(length))
        self.norm2 = nn.ModuleList(_norm(width, norm) for _ in range(length))

    def step(self, x: Tensor, t: int) -> Tensor:
        out = F.relu(self.norm1[t](self.conv1(x) * self.scales["conv1"][t]))
        return F.relu(x + self.norm2[t](self.conv2(out) * self.scales["conv2"][t]))


class AlgorithmicNet(nn.Module):
    """projection (in -> w) -> body -> head (w -> w/2 -> classes), 3-wide convs, ReLU, no bias.

    ``forward(x, iterations)`` runs `iterations` blocks (ff/shared: at most `depth`, the first
    ones) or loop steps (recurrent: any number; default `depth`, the trained count). A folded
    shared net (`fold`, built by softshare.fold) counts every loop step as an iteration; its
    loops run longer after ``softshare.fold.set_iterations``.
    """

    def __init__(self, dim: int, body: str, in_channels: int, num_classes: int = 2, width: int = 64,
                 depth: int = 8, num_templates: int | None = None, recall: bool = False,
                 norm: bool = False, fold: dict | None = None) -> None:
        super().__init__()
        _check_args(body, width, depth, num_templates, recall)
        loops = _fold_loops(fold, body, depth)
        self.dim, self.body, self.depth = dim, body, depth
        self.projection = _conv(dim, in_channels, width)
        self.recall = _conv(dim, width + in_channels, width) if recall else None
        shared = body == "shared" and loops is None
        self.bank = TemplateBank(num_templates, (width, width) + (3,) * dim) if shared else None
        if loops is not None:
            blocks = [LoopResidualBlock(dim, width, n, norm) for n in loops]
        else:
            blocks = [ResidualBlock(dim, width, self.bank, norm) for _ in range(1 if body == "recurrent" else depth)]
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(_conv(dim, width, width // 2), nn.ReLU(), _conv(dim, width // 2, num_classes))
        if self.bank is not None:
            # PyTorch's default conv init (as the unshared convs here, and Bansal et al.): the ReLU
            # gain the bank uses would double the activations' variance per un-normalised block.
            for template in self.bank.templates.data:
                nn.init.kaiming_uniform_(template, a=math.sqrt(5))
            init_coefficients(self.bank.layers)  # orthogonal rows: layers start far apart

    def _schedule(self) -> list[tuple[nn.Module, int | None]]:
        """(block, loop step or None) per iteration of the ff/shared body, folded loops unrolled."""
        steps: list[tuple[nn.Module, int | None]] = []
        for block in self.blocks:
            if isinstance(block, LoopBlock):
                steps += [(block, min(t, block.length - 1)) for t in range(block.iterations or block.length)]
            else:
                steps.append((block, None))
        return steps

    @property
    def max_iterations(self) -> int | None:
        """The most iterations this net can run (None: unbounded, the recurrent body)."""
        return None if self.body == "recurrent" else len(self._schedule())

    def check_iterations(self, start: int, count: int) -> None:
        if count < 1 or start < 0:
            raise SoftshareError(f"iterations must be >= 1 (and start >= 0), got {count} from {start}")
        most = self.max_iterations
        if most is not None and start + count > most:
            raise SoftshareError(f"this {self.body} net runs at most {most} iterations (blocks), got "
                                 f"{start + count}; only the recurrent net (or a folded shared net after "
                                 f"set_iterations) runs more")

    def embed(self, x: Tensor) -> Tensor:
        """The state before the first iteration."""
        return F.relu(self.projection(x))

    def iterate(self, x: Tensor, count: int, start: int = 0, state: Tensor | None = None) -> Iterator[Tensor]:
        """Yield the state after each of `count` iterations, continuing `state` after `start` ones."""
        self.check_iterations(start, count)
        if state is None:
            state = self.embed(x)
        if self.body == "recurrent":
            for _ in range(count):
                if self.recall is not None:
                    state = self.recall(torch.cat([state, x], dim=1))
                state = self.blocks[0](state)
                yield state
            return
        for block, t in self._schedule()[start:start + count]:
            state = block(state) if t is None else block.step(state, t)
            yield state

    def forward(self, x: Tensor, iterations: int | None = None, *, start: int = 0, state: Tensor | None = None,
                return_all: bool = False, return_state: bool = False):
        """Logits (N, classes, *spatial), or with `return_all` (N, iterations, classes, *spatial).

        `start`/`state` continue a run (the progressive loss); `return_state` also returns the
        final state, as ``(logits, state)``.
        """
        count = self.depth if iterations is None else int(iterations)
        outputs = []
        for state in self.iterate(x, count, start, state):
            if return_all:
                outputs.append(self.head(state))
        logits = torch.stack(outputs, dim=1) if return_all else self.head(state)
        return (logits, state) if return_state else logits


def _check_args(body: str, width: int, depth: int, num_templates: int | None, recall: bool) -> None:
    if body not in BODIES:
        raise SoftshareError(f"unknown body {body!r}; use one of {', '.join(BODIES)}")
    if width < 2 or depth < 1:
        raise SoftshareError(f"width must be >= 2 and depth >= 1, got width={width}, depth={depth}")
    if body == "shared":
        if num_templates is None or not 1 <= num_templates <= 2 * depth:
            raise SoftshareError(f"a shared net of depth {depth} has {2 * depth} convs, so num_templates must "
                                 f"be from 1 to {2 * depth}, got {num_templates}")
    elif num_templates is not None:
        raise SoftshareError(f"num_templates applies only to the shared body, not {body!r}")
    if recall and body != "recurrent":
        raise SoftshareError(f"recall applies only to the recurrent body, not {body!r}")


def _fold_loops(fold: dict | None, body: str, depth: int) -> list[int] | None:
    """Loop lengths of a folded shared net from ``{"loops": [[n1, n2, ...]]}`` (one site: the blocks)."""
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
    describe = {"ff": "D distinct residual blocks (feed-forward control)",
                "shared": "D residual blocks mixing all convs from one bank of k templates",
                "recurrent": "one residual block looped T times (optional recall)"}[body]

    def build(num_classes: int = 2, in_channels: int = 3, width: int = 64, depth: int = 8,
              num_templates: int | None = 2 if body == "shared" else None, recall: bool = False,
              norm: bool = False, fold: dict | None = None) -> AlgorithmicNet:
        return AlgorithmicNet(dim, body, in_channels, num_classes, width, depth, num_templates, recall, norm, fold)

    name = f"{prefix}_{body}"
    register_family(name, name, [name], f"{what}: {describe}", small_example=name,
                    input_size=(24, 24) if dim == 2 else (32,))(build)


for _prefix in _DIMS:
    for _body in BODIES:
        _register(_prefix, _body)
