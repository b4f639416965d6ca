"""Model families registered by name pattern and built by `create_model` (timm-style)."""

from __future__ import annotations

import fnmatch
import inspect
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
    1-D or 2-D from the model's first convolution. `renamed` lists ``(old, new)`` prefixes of
    module names the family has renamed, so that checkpoints saved before still load.
    """

    name: str
    pattern: re.Pattern
    builder: Callable[..., nn.Module]
    examples: list[str] = field(default_factory=list)
    description: str = ""
    small_example: str | None = None
    input_size: tuple[int, ...] | None = None
    renamed: tuple[tuple[str, str], ...] = ()


    def readable_pattern(self) -> str:
        """The name pattern for people: ``swrn_L_w_k``, ``resnet_L (L: 26, 50, 101 or 152)``, not the
        regex. Each integer group is named after the builder argument it fills (depth L, widen w,
        num_templates k, else the argument's name); a lookahead (an exclusion) is left out."""
        params = [name for name in inspect.signature(self.builder).parameters][:self.pattern.groups]
        text, out, notes, group, i = self.pattern.pattern, [], [], 0, 0
        while i < len(text):
            if text.startswith("(?!", i) or text.startswith("(?=", i):
                i = _closing(text, i) + 1
            elif text[i] == "(" and not text.startswith("(?", i):
                end = _closing(text, i)
                symbol = _SYMBOLS.get(params[group], params[group]) if group < len(params) else f"n{group}"
                choices = text[i + 1:end].split("|")
                if len(choices) > 1 and all(c.isdigit() for c in choices):
                    notes.append(f"{symbol}: {', '.join(choices[:-1])} or {choices[-1]}")
                out.append(symbol)
                group, i = group + 1, end + 1
            elif text[i] == "\\" and i + 1 < len(text):
                out.append(text[i + 1])
                i += 2
            else:
                out.append(text[i])
                i += 1
        return "".join(out) + (f" ({'; '.join(notes)})" if notes else "")


_SYMBOLS = {"depth": "L", "widen": "w", "num_templates": "k"}  # the paper's names for a model's sizes


def _closing(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at `start`."""
    depth, index = 0, start
    while index < len(text):
        if text[index] == "\\":
            index += 2
            continue
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return index
        index += 1
    raise SoftshareError(f"unbalanced parentheses in the model name pattern {text!r}")


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(name: str, pattern: str, examples: list[str], description: str = "",
                    small_example: str | None = None, input_size: tuple[int, ...] | None = None,
                    renamed: tuple[tuple[str, str], ...] = ()):
    """Decorator: register `builder(*int_groups, num_classes=, in_channels=, **kwargs)`."""
    compiled = re.compile(pattern)
    if small_example is not None and not compiled.fullmatch(small_example):
        raise SoftshareError(f"small_example {small_example!r} of model family {name!r} does not match {pattern!r}")

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _FAMILIES[name] = ModelFamily(name, compiled, builder, list(examples), description, small_example,
                                      None if input_size is None else tuple(input_size), tuple(renamed))
        return builder

    return decorator


def list_families() -> list[ModelFamily]:
    return list(_FAMILIES.values())


def list_models(pattern: str = "*") -> list[str]:
    """The named configurations of every family (any other size of a family works too)."""
    names = [n for family in _FAMILIES.values() for n in family.examples]
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


# Integers in a model name (depth, width, templates...) above this are typos, not models: a
# WRN of depth 10^17 would loop for ever building its blocks, even on the meta device.
MAX_NAME_INT = 1000
MAX_CLASSES = 1_000_000
MAX_IN_CHANNELS = 4096
# Integer model arguments (--model-args, a checkpoint's meta.json) above this are typos too:
# widths, depths and template counts of real models are far below it.
MAX_ARG_INT = 100_000


def find_family(name: str) -> tuple[ModelFamily, list[int]]:
    """The family a model name belongs to and the integers in it; absurd sizes are refused."""
    for family in _FAMILIES.values():
        match = family.pattern.fullmatch(name)
        if match:
            args = [int(g) for g in match.groups()]
            if any(a > MAX_NAME_INT for a in args):
                raise SoftshareError(f"model {name!r} asks for sizes of {max(args):,}; numbers in a model name "
                                     f"are at most {MAX_NAME_INT:,} (e.g. swrn_28_10_2)")
            return family, args
    families = ", ".join(f.readable_pattern() for f in _FAMILIES.values())
    err = unknown_name("model", name, list_models())
    raise SoftshareError(f"{err}. Families: {families}")


def current_name(model_name: str | None, module_name: str) -> str:
    """`module_name` (a state-dict key or layer name of a `model_name` model) as the family names
    it today: what a checkpoint saved before a rename held under the old name."""
    family = next((f for f in _FAMILIES.values() if model_name and f.pattern.fullmatch(model_name)), None)
    for old, new in family.renamed if family is not None else ():
        if module_name.startswith(old):
            return new + module_name[len(old):]
    return module_name


def check_model_args(name: str, kwargs: dict) -> None:
    """Refuse keyword arguments `name`'s builder does not take, before anything is built."""
    family, _ = find_family(name)
    params = inspect.signature(family.builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    named = list(params)[family.pattern.groups:]  # the first parameters take the integers of the name
    accepted = [k for k in named if k not in ("num_classes", "in_channels")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise SoftshareError(f"model {name} does not take {', '.join(map(repr, unknown))}; its model arguments are: "
                             f"{', '.join(accepted) or 'none'}")


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a registered model, e.g. ``create_model("swrn_28_10_2", num_classes=100)``.

    The returned module carries ``softshare_config`` (name and arguments) so checkpoints can
    rebuild it. ``pretrained=True`` (timm's spelling) is refused: softshare ships no trained
    weights; a trained run loads with `softshare.load`.
    """
    if kwargs.pop("pretrained", False):
        raise SoftshareError(f"softshare ships no pretrained weights for {name!r}; train it (softshare train) "
                             f"and load the run with softshare.load('runs/<name>'), or drop pretrained=True")
    family, args = find_family(name)
    for what, value, limit in (("num_classes", num_classes, MAX_CLASSES), ("in_channels", in_channels, MAX_IN_CHANNELS)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise SoftshareError(f"{what} must be an integer from 1 to {limit:,}, got {value!r}")
    absurd = [f"{key}={value:,}" for key, value in kwargs.items()
              if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_ARG_INT]
    if absurd:
        raise SoftshareError(f"model {name}: {', '.join(absurd)} is far beyond any model (integer model arguments "
                             f"are at most {MAX_ARG_INT:,}); fix --model-args (or the checkpoint's meta.json)")
    try:
        model = family.builder(*args, num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as err:  # an argument twice (in the name and in kwargs) or of the wrong type
        raise SoftshareError(f"cannot build model {name} with arguments {kwargs}: {str(err).splitlines()[0]}; "
                             f"fix --model-args") from None
    model.softshare_config = {"name": name, "num_classes": num_classes, "in_channels": in_channels, **kwargs}
    return model
