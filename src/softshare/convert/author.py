"""Convert checkpoints of the paper's reference implementation (lolemacs/soft-sharing) to softshare.

Those files are whole pickles: besides the weights they hold the reference code's own objects
(a `utils.RecorderMeter`, numpy arrays, optimizer state). They are read with a restricted
unpickler that imports only tensor/numpy rebuild functions and turns every other global into an
inert stand-in, so opening a file from the internet cannot run code.
"""

from __future__ import annotations

import os
import pickle
import re
import types
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import dedupe_state_dict, save_checkpoint
from ..data.unpickle import NUMPY_GLOBALS, AllowListUnpickler
from ..errors import SoftshareError
from ..storage import atomic_path, check_output, mark_output
from ..models import create_model


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Protocol 2 spells bytes as ``_codecs.encode(text, "latin1")``; no other codec is honoured."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with codec {encoding!r}")
    return text.encode("latin1")


def _checked_rebuild(rebuild: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A tensor rebuild that first proves the view lies inside its storage.

    A crafted file can describe a huge tensor over a tiny storage (e.g. stride 0): the view is
    free, but the first copy would allocate terabytes. Sizes and strides are checked first.
    """
    def rebuild_checked(storage: Any, storage_offset: int, size: tuple, stride: tuple, *args: Any) -> Tensor:
        untyped = getattr(storage, "_untyped_storage", storage)  # TypedStorage wraps the bytes
        numel = untyped.nbytes() // max(getattr(storage, "dtype", torch.uint8).itemsize, 1)
        dims = (*size, *stride, storage_offset)
        if not all(isinstance(d, int) and d >= 0 for d in dims) or len(size) != len(stride):
            raise pickle.UnpicklingError(f"a tensor has invalid size {size}, stride {stride} or offset {storage_offset}")
        count = 1
        for d in size:
            count *= d
        last = storage_offset + sum((d - 1) * s for d, s in zip(size, stride)) if count else storage_offset
        if count and (count > numel or last >= numel):
            raise pickle.UnpicklingError(f"a tensor of size {tuple(size)} (stride {tuple(stride)}) does not fit its "
                                         f"storage of {numel:,} elements")
        return rebuild(storage, storage_offset, size, stride, *args)
    return rebuild_checked


_ALLOWED: dict[tuple[str, str], Any] = {
    **NUMPY_GLOBALS,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _checked_rebuild(torch._utils._rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _checked_rebuild(torch._utils._rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("_codecs", "encode"): _latin1_bytes,
}


class Opaque:
    """Inert stand-in for a class or function the restricted unpickler will not import.

    Calling, instantiating or restoring state only records the arguments, so a pickled
    ``os.system("...")`` becomes an Opaque object and nothing runs.
    """

    qualname = "?"
    args: tuple = ()
    kwargs: dict = {}
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {self.qualname}>"


class RestrictedUnpickler(AllowListUnpickler):
    """Resolves only allow-listed globals (tensors, numpy) and stands in for the rest."""

    allowed = _ALLOWED

    def refuse(self, module: str, name: str) -> Callable[..., Any]:
        return type(name, (Opaque,), {"qualname": f"{module}.{name}", "__module__": __name__})


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# What torch.load calls `pickle_module`: it only uses `Unpickler`, `load` and `__name__`.
restricted_pickle = types.SimpleNamespace(__name__=__name__, Unpickler=RestrictedUnpickler, load=_restricted_load)


def read_author_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Unpickle a reference-implementation file safely; returns the top-level dict."""
    path = Path(path)
    if not path.is_file():
        raise SoftshareError(f"{path} does not exist or is not a file; pass the .pth.tar saved by the "
                             f"reference implementation (checkpoint.pth.tar or model_best.pth.tar)")
    try:
        # Not an unrestricted load: every global goes through RestrictedUnpickler.find_class.
        # latin1 decodes the Python 2 str objects (and numpy buffers) of files from 2019.
        obj = torch.load(path, map_location="cpu", pickle_module=restricted_pickle,
                         weights_only=False, encoding="latin1")
    except Exception as err:  # truncated zip, bad pickle stream, ...: all mean "unreadable file"
        raise SoftshareError(f"cannot read {path} as a PyTorch checkpoint ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); check the file is complete") from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return {"state_dict": obj}
    raise SoftshareError(f"{path} holds no 'state_dict'; pass a checkpoint saved by the reference "
                         f"implementation's main.py (checkpoint.pth.tar or model_best.pth.tar)")


# -- key mapping --------------------------------------------------------------------------------
_RULES: list[tuple[re.Pattern, Callable[[re.Match], str]]] = [
    (re.compile(r"conv_3x3\.weight"), lambda m: "stem.weight"),
    (re.compile(r"bank_(\d+)\.templates"), lambda m: f"stages.{int(m[1]) - 1}.bank.templates"),
    (re.compile(r"stage_(\d+)\.(\d+)\.(bn[12]\.\w+|conv[12]\.weight|conv[12]\.coefficients)"),
     lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.{m[3]}"),
    (re.compile(r"stage_(\d+)\.(\d+)\.convShortcut\.weight"),
     lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.shortcut.weight"),
    (re.compile(r"lastact\.0\.(\w+)"), lambda m: f"bn.{m[1]}"),
    (re.compile(r"classifier\.(weight|bias)"), lambda m: f"fc.{m[1]}"),
]
# Every block and shared conv re-lists its stage's bank; those copies carry no information.
_BANK_COPY = re.compile(r"stage_(\d+)\.\d+\.(?:conv[12]\.)?bank\.templates")


def _softshare_key(key: str) -> str | None:
    for pattern, rename in _RULES:
        match = pattern.fullmatch(key)
        if match:
            return rename(match)
    return None


def guess_model_name(state: dict[str, Tensor]) -> str | None:
    """The softshare name (swrn_L_w_k, or wrn_L_w without banks) a reference state dict matches.

    `state` has the reference model's keys, without nn.DataParallel's ``module.`` prefix.
    """
    blocks = {int(m[1]) for k in state if (m := re.match(r"stage_1\.(\d+)\.", k))}
    first = state.get("stage_1.0.conv1.weight")
    if not blocks or first is None or first.dim() != 4 or first.shape[0] % 16:
        return None
    depth, width = 6 * (max(blocks) + 1) + 4, first.shape[0] // 16
    bank = state.get("bank_1.templates")
    return f"swrn_{depth}_{width}_{bank.shape[0]}" if isinstance(bank, Tensor) else f"wrn_{depth}_{width}"


def convert_state_dict(author_state: dict[str, Any], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map a reference state dict onto the keys of `target` (a softshare model's state dict).

    `author_state` has the reference model's keys, without nn.DataParallel's ``module.`` prefix.
    Returns the full target state dict (shared banks under all their keys). Raises one error
    listing every tensor that does not fit: unknown, missing or of the wrong shape.
    """
    unique, aliases = dedupe_state_dict(target)
    converted: dict[str, Tensor] = {}
    unknown, shapes = [], []
    for key, value in author_state.items():
        copy = _BANK_COPY.fullmatch(key)
        if copy:
            main = author_state.get(f"bank_{copy[1]}.templates")
            if isinstance(main, Tensor) and isinstance(value, Tensor) and torch.equal(main, value):
                continue
        new_key = _softshare_key(key)
        if new_key not in unique or not isinstance(value, Tensor):
            unknown.append(key)
            continue
        expected = unique[new_key].shape
        if new_key.endswith(".coefficients") and value.numel() == expected.numel():
            value = value.reshape(expected)  # reference coefficients are (k, 1, 1, 1, 1)
        if value.shape != expected:
            shapes.append(f"{key} {tuple(value.shape)} vs {tuple(expected)}")
            continue
        converted[new_key] = value
    missing = [k for k in unique if k not in converted]
    if unknown or shapes or missing:
        parts = [f"{len(items)} {what} ({'; '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
                 for what, items in (("unexpected tensors", unknown), ("wrong shapes", shapes),
                                     ("missing tensors", missing)) if items]
        raise SoftshareError(", ".join(parts))
    converted.update({alias: converted[stored] for alias, stored in aliases.items()})
    return converted


def convert_author(path: str | os.PathLike, model_name: str, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Convert a reference-implementation checkpoint into a softshare checkpoint directory `out`.

    The class count and input channels come from the file; the architecture from `model_name`.
    `out` must be new, empty or an earlier conversion, unless `overwrite`.
    """
    out = check_output(out, "convert-author", overwrite=overwrite, protect=[path])
    raw = read_author_checkpoint(path)
    state = {k.removeprefix("module."): v for k, v in raw["state_dict"].items()}
    classifier, stem = state.get("classifier.weight"), state.get("conv_3x3.weight")
    if not isinstance(classifier, Tensor) or not isinstance(stem, Tensor) or classifier.dim() != 2 or stem.dim() != 4:
        raise SoftshareError(f"{path} has no classifier.weight / conv_3x3.weight of the reference SWRN; "
                             f"it is not a checkpoint of lolemacs/soft-sharing's swrn")
    model = create_model(model_name, num_classes=classifier.shape[0], in_channels=stem.shape[1])
    try:
        converted = convert_state_dict(state, model.state_dict())
    except SoftshareError as err:
        guess = guess_model_name(state)
        hint = (f"this looks like {guess}: rerun with --model {guess}" if guess and guess != model_name
                else "the file is incomplete or not from the reference implementation")
        raise SoftshareError(f"{path} does not fit {model_name}: {err}; {hint}") from err
    model.load_state_dict(converted, strict=True)
    epoch = raw.get("epoch")
    with atomic_path(out) as tmp:
        save_checkpoint(tmp, model, epoch=epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None)
        mark_output(tmp, "convert-author")
    return out
