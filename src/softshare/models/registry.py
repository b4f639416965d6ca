"""Model families registered by name pattern and built by `create_model` (timm-style)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..errors import SoftshareError, unknown_name


@dataclass
class ModelFamily:
    """Names matching `pattern` (a regex whose groups are integer arguments) build via `builder`.

    `small_example` names a small member (any name matching `pattern`) that tests build and
    train on CPU; by default the example with the fewest parameters. `input_size` is the
    spatial size of one input sample, e.g. ``(32, 32)`` or ``(64,)``; by default tests derive
    1-D or 2-D from the model's first convolution.
    """

    name: str
    pattern: re.Pattern
    builder: Callable[..., nn.Module]
    examples: list[str] = field(default_factory=list)
    description: str = ""
    small_example: str | None = None
    input_size: tuple[int, ...] | None = None


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(name: str, pattern: str, examples: list[str], description: str = "",
                    small_example: str | None = None, input_size: tuple[int, ...] | None = None):
    """Decorator: register `builder(*int_groups, num_classes=, in_channels=, **kwargs)`."""
    compiled = re.compile(pattern)
    if small_example is not None and not compiled.fullmatch(small_example):
        raise SoftshareError(f"small_example {small_example!r} of model family {name!r} does not match {pattern!r}")

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _FAMILIES[name] = ModelFamily(name, compiled, builder, list(examples), description, small_example,
                                      None if input_size is None else tuple(input_size))
        return builder

    return decorator


def list_families() -> list[ModelFamily]:
    return list(_FAMILIES.values())


def list_models(pattern: str = "*") -> list[str]:
    """The named configurations of every family (any other size of a family works too)."""
    names = [n for family in _FAMILIES.values() for n in family.examples]
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a registered model, e.g. ``create_model("swrn_28_10_2", num_classes=100)``.

    The returned module carries ``softshare_config`` (name and arguments) so checkpoints can
    rebuild it. ``pretrained=True`` (timm's spelling) is refused: softshare ships no trained
    weights; a trained run loads with `softshare.load`.
    """
    if kwargs.pop("pretrained", False):
        raise SoftshareError(f"softshare ships no pretrained weights for {name!r}; train it (softshare train) "
                             f"and load the run with softshare.load('runs/<name>'), or drop pretrained=True")
    for family in _FAMILIES.values():
        match = family.pattern.fullmatch(name)
        if match:
            args = [int(g) for g in match.groups()]
            model = family.builder(*args, num_classes=num_classes, in_channels=in_channels, **kwargs)
            model.softshare_config = {"name": name, "num_classes": num_classes,
                                      "in_channels": in_channels, **kwargs}
            return model
    families = ", ".join(f"{f.name} ({f.pattern.pattern})" for f in _FAMILIES.values())
    err = unknown_name("model", name, list_models())
    raise SoftshareError(f"{err}. Families: {families}")
