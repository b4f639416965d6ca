"""The explicit loop a run of collinear soft-shared blocks folds into.

A block whose shared layers all have (near) collinear coefficient vectors across iterations
t = 0..n-1 is one block applied n times: ``W_t = c_t * W``. A `LoopBlock` holds each shared
layer ONCE as a plain layer with weight W, and per iteration only what cannot be shared exactly:
its own normalisation layers and the scalars c_t. Since conv and linear layers are linear,
``layer(x, c_t W) = c_t * layer(x, W)``: the scale multiplies the output, no weight is rebuilt.

Convention that `softshare.fold` relies on to transfer weights (model families building loops
must follow it): every stateful child of the original block that is not a shared layer becomes
a ModuleList of n copies under the same name; every shared layer ("role") becomes a plain layer
under the same name; ``scales[role]`` holds c_0..c_{n-1}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import SoftshareError, unknown_name


class LoopBlock(nn.Module):
    """Base of folded blocks: `forward` runs ``x = self.step(x, t)`` for t in range(iterations).

    `iterations` (default: the trained length n) may be raised at inference to run the loop
    longer than trained; iterations t >= n reuse the normalisation and scales of t = n-1.
    """

    def __init__(self, length: int, roles: Sequence[str]) -> None:
        super().__init__()
        if int(length) < 1:
            raise SoftshareError(f"a loop needs at least 1 iteration, got {length}")
        self.length = int(length)
        self.roles = tuple(roles)
        self.scales = nn.ParameterDict({role: nn.Parameter(torch.ones(self.length)) for role in self.roles})
        self.iterations: int | None = None

    def step(self, x: Tensor, t: int) -> Tensor:
        """One iteration with the state of iteration t (0 <= t < length)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        for t in range(self.iterations or self.length):
            x = self.step(x, min(t, self.length - 1))
        return x

    def extra_repr(self) -> str:
        extra = f", iterations={self.iterations}" if self.iterations else ""
        return f"length={self.length}, roles={self.roles}{extra}"


def loop_blocks(model: nn.Module) -> list[tuple[str, LoopBlock]]:
    """The folded loops of `model` with their module names, in forward (module) order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoopBlock)]


def set_iterations(model: nn.Module, iterations: int | Mapping[str, int] | None) -> None:
    """Override how many times folded loops run (e.g. to think longer on larger mazes).

    An int applies to every loop of trained length >= 2 (a length-1 "loop" is an unfolded block);
    a mapping sets loops by module name; None restores the trained lengths everywhere.
    """
    loops = loop_blocks(model)
    if not loops:
        raise SoftshareError(f"{type(model).__name__} has no folded loops; fold it first with softshare.fold")
    if iterations is None:
        for _, loop in loops:
            loop.iterations = None
        return
    if isinstance(iterations, Mapping):
        by_name = dict(loops)
        for name in iterations:
            if name not in by_name:
                raise unknown_name("loop", name, by_name)
        targets = [(by_name[name], count) for name, count in iterations.items()]
    else:
        targets = [(loop, iterations) for _, loop in loops if loop.length >= 2]
    for _, count in targets:
        if int(count) < 1:
            raise SoftshareError(f"loop iterations must be >= 1, got {count}")
    for loop, count in targets:
        loop.iterations = int(count)
