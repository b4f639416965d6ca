"""Resource budgets, checked before anything is allocated: a model's parameters and a training
step's activations against the memory of the device, a file against the free disk.

A size a user typed (or a file declared) is only ever allocated once it is known to fit. The
memory budget is the device's memory (RAM, or the GPU's), or ``SOFTSHARE_MEMORY_BUDGET`` (GiB)
where that is set; every refusal states the budget and how to change it. Models are sized by
building them on the meta device (no memory) while counting: a build that passes the budget or
`MAX_MODULES` stops at once, so even an absurd size costs only the part built before it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import SoftshareError

BUDGET_ENV = "SOFTSHARE_MEMORY_BUDGET"
# A model of more modules than this is a typo, not a model (SWRN-28-10 has ~130, a 30-iteration
# algorithmic net ~300, the largest the config ranges allow ~80,000): refused before it is built.
MAX_MODULES = 200_000
# Bytes per parameter while training: weights, gradients and up to two optimizer moments (fp32).
TRAIN_BYTES_PER_PARAM = 16
GIB = 1 << 30


def memory_budget(device: torch.device | str = "cpu") -> tuple[int, str]:
    """(bytes a job may allocate on `device`, where that number comes from)."""
    spec = os.environ.get(BUDGET_ENV)
    if spec:
        try:
            value = float(spec)
            if not value > 0:
                raise ValueError
        except ValueError:
            raise SoftshareError(f"{BUDGET_ENV}={spec!r} is not a positive number of GiB; set it to e.g. 64, "
                                 f"or unset it to use the device's memory") from None
        return int(value * GIB), f"{BUDGET_ENV}={spec}"
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory
        return total, f"the memory of {torch.cuda.get_device_name(device)}"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no check beyond what the OS refuses
        total = 1 << 62
    return total, "this machine's RAM"


def _size(n: float) -> str:
    return f"{n / GIB:,.1f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):,.1f} MiB"


def check_fits(need: float, what: str, fix: str, device: torch.device | str = "cpu") -> None:
    """Refuse `what` needing `need` bytes when that exceeds the memory budget of `device`."""
    budget, source = memory_budget(device)
    if need > budget:
        raise SoftshareError(f"{what} needs about {_size(need)}, more than the {_size(budget)} budget ({source}); "
                             f"{fix}, or set {BUDGET_ENV}=GiB to allow more")


def check_disk(need: float, path: str | os.PathLike, what: str, fix: str) -> None:
    """Refuse writing `need` bytes under `path` when its file system has less free space."""
    parent = Path(path)
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if need > free:
        raise SoftshareError(f"{what} would take {_size(need)} on disk but {parent} has {_size(free)} free; {fix}")


class _Counter:
    def __init__(self, max_params: float, what: str, fix: str) -> None:
        self.params = self.modules = 0
        self.max_params, self.what, self.fix = max_params, what, fix
        self._seen: set[int] = set()

    def parameter(self, module: nn.Module, name: str, param: torch.Tensor | None) -> None:
        if param is None or id(param) in self._seen:
            return
        self._seen.add(id(param))
        self.params += param.numel()
        if self.params > self.max_params:
            raise SoftshareError(f"{self.what} has more than {self.max_params:,.0f} parameters (counted while "
                                 f"building it on the meta device, nothing allocated); {self.fix}")

    def module(self, parent: nn.Module, name: str, child: nn.Module | None) -> None:
        self.modules += 1
        if self.modules > MAX_MODULES:
            raise SoftshareError(f"{self.what} has more than {MAX_MODULES:,} modules, far beyond any model here "
                                 f"(counted while building it on the meta device); {self.fix}")


@contextlib.contextmanager
def _counting(counter: _Counter) -> Iterator[None]:
    handles = [module_hooks.register_module_parameter_registration_hook(counter.parameter),
               module_hooks.register_module_module_registration_hook(counter.module)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def build_skeleton(build: Callable[[], nn.Module], max_params: float, what: str, fix: str) -> nn.Module:
    """`build()` on the meta device, stopped with one clear error as soon as it passes `max_params`
    parameters or MAX_MODULES modules; returns the skeleton (shapes only)."""
    counter = _Counter(max_params, what, fix)
    with torch.device("meta"), _counting(counter):
        return build()


class _OutputBytes(TorchDispatchMode):
    """Bytes of every tensor an op creates (an upper bound of what a forward keeps for backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.bytes += tensor.numel() * tensor.element_size()
        return out


def activation_bytes(skeleton: nn.Module, forward: Callable[[nn.Module, int], object]) -> tuple[int, int]:
    """(bytes per example, bytes independent of the batch) a forward of the meta `skeleton` creates:
    `forward(model, batch)` runs it on a meta batch of that size; measured at batch 1 and 2."""
    measured, was_training = [], skeleton.training
    skeleton.eval()
    try:
        for batch in (1, 2):
            counter = _OutputBytes()
            with torch.no_grad(), counter:
                forward(skeleton, batch)
            measured.append(counter.bytes)
    finally:
        skeleton.train(was_training)
    per_example = max(measured[1] - measured[0], 0)
    return per_example, max(measured[0] - per_example, 0)
