"""Checkpoint directories (see docs/DESIGN.md, "Checkpoints") and `load()`.

A checkpoint is a directory written atomically: `model.safetensors` (each tensor once, so a
template bank shared by many layers costs its size once on disk), `meta.json` (enough to rebuild
the model with `create_model`) and optionally `state.pt` (optimizer/scheduler/RNG state, kept
to what `torch.load(weights_only=True)` accepts so resuming never runs pickled code).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import SoftshareError
from .storage import atomic_path, crash_point
from .layers.structure import describe_banks, match_banks
from .models import create_model
from .models.registry import current_name
from .pretrained import is_pretrained, pretrained_path
from .version import __version__
from .wrappers import unwrap_model

FORMAT = "softshare-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
STATE_FILE = "state.pt"
_ACCEPTS = ("a run directory (runs/<name>/), a checkpoint directory or its model.safetensors, or "
            "pretrained:NAME (softshare.pretrained.catalogue())")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the full state dict (shared tensors under all their keys) and meta."""

    state_dict: dict[str, Tensor]
    meta: dict[str, Any]
    train_state: dict[str, Any] | None
    path: Path


# -- saving -------------------------------------------------------------------------------------
def dedupe_state_dict(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Split a state dict into unique contiguous CPU tensors and ``{alias_key: stored_key}``.

    Keys viewing the same memory the same way (a bank listed under every layer using it) are
    stored once, under the first key; safetensors refuses tensors that share memory.
    """
    unique: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    first_key: dict[tuple, str] = {}
    stored_memory: set[int] = set()
    for key, tensor in state.items():
        view = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if view in first_key:
            aliases[key] = first_key[view]
            continue
        first_key[view] = key
        stored = tensor.detach().to("cpu").contiguous()
        if stored.numel() and stored.untyped_storage().data_ptr() in stored_memory:  # a different view
            stored = stored.clone()
        stored_memory.add(stored.untyped_storage().data_ptr())
        unique[key] = stored
    return unique, aliases


def _reason(err: Exception) -> str:
    """A one-line cause from torch.load's multi-paragraph errors (never its advice to unpickle)."""
    text = str(err)
    unsupported = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", text)
    if unsupported:
        return f"it pickles {unsupported[1]}"
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first}" if first and "weights_only" not in first else type(err).__name__


def is_refused_pickle(err: Exception) -> bool:
    """Whether torch.load(weights_only=True) refused the file for holding code or arbitrary objects."""
    return isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err)


def refused_pickle_message(path: Path, err: Exception, fix: str) -> str:
    """One line for a pickle holding code or objects: what it is, and a safe way forward."""
    return (f"{path} holds code or objects softshare will not load ({_reason(err)}); softshare never runs "
            f"pickled code, so it was not written by softshare or was tampered with. {fix}")


def _save_train_state(train_state: Mapping[str, Any], path: Path) -> None:
    """torch.save, then prove the file reads back with weights_only=True (mmap: no data copy)."""
    torch.save(dict(train_state), path)
    try:
        torch.load(path, weights_only=True, mmap=True)
    except Exception as err:  # UnpicklingError naming the offending global
        raise SoftshareError(f"train_state cannot be read back with torch.load(weights_only=True) ({_reason(err)}, "
                             f"which weights_only loading refuses); "
                             f"store tensors, numbers, strings and lists/dicts of them (e.g. RNG states "
                             f"as tensors)") from err


def save_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    *,
    config: Mapping[str, Any] | None = None,
    epoch: int | None = None,
    step: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    best_metric: float | None = None,
    train_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` (and optionally training state) as a checkpoint directory; returns its path.

    Everything is validated before the disk is touched, and the directory is built beside the
    target and renamed into place, so a failure leaves any previous checkpoint there intact.
    """
    directory = Path(directory)
    model = unwrap_model(model)
    model_config = getattr(model, "softshare_config", None)
    if not isinstance(model_config, Mapping):  # a foreign model: load_into() rebuilds it
        cls = type(model)
        model_config = {"name": None, "class": f"{cls.__module__}.{cls.__qualname__}"}
    replaceable = directory.is_dir() and (not any(directory.iterdir()) or (directory / MODEL_FILE).exists()
                                          or (directory / META_FILE).exists())
    if directory.exists() and not replaceable:
        raise SoftshareError(f"refusing to replace {directory}: it exists and is not a softshare checkpoint; "
                             f"save into a new directory, e.g. {directory / 'checkpoints' / 'last'}")
    tensors, aliases = dedupe_state_dict(model.state_dict())
    meta = {"format": FORMAT, "version": VERSION, "model": dict(model_config),
            "config": None if config is None else dict(config), "epoch": epoch, "step": step,
            "metrics": dict(metrics or {}), "best_metric": best_metric, "softshare_version": __version__,
            "torch_version": torch.__version__, "aliases": aliases, "banks": describe_banks(model)}
    try:
        meta_text = json.dumps(meta, indent=2, allow_nan=True) + "\n"
    except (TypeError, ValueError) as err:
        raise SoftshareError(f"cannot save checkpoint {directory}: its meta data is not JSON ({err}); pass "
                             f"config and metrics as dicts of numbers, strings, lists and dicts") from err
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        save_file(tensors, tmp / MODEL_FILE)
        crash_point("weights", directory)
        if train_state is not None:
            _save_train_state(train_state, tmp / STATE_FILE)
            crash_point("state", directory)
        (tmp / META_FILE).write_text(meta_text)
    return directory


# -- finding and reading ------------------------------------------------------------------------
def find_checkpoint(run_or_path: str | os.PathLike) -> Path:
    """The checkpoint directory for a run directory (best, else last), checkpoint dir, weights file,
    or a net shipped with softshare (``pretrained:NAME``)."""
    if is_pretrained(run_or_path):
        return pretrained_path(str(run_or_path))
    path = Path(run_or_path)
    if not path.exists():
        raise SoftshareError(f"{path} does not exist; pass {_ACCEPTS}")
    if path.is_file():
        if path.name == MODEL_FILE:
            return path.parent
        raise SoftshareError(f"{path} is not a softshare checkpoint; pass {_ACCEPTS} "
                             f"(for a .pth.tar from the paper's code, run `softshare convert-author` first)")
    for candidate in (path, path / "checkpoints" / "best", path / "checkpoints" / "last"):
        if (candidate / MODEL_FILE).is_file() or (candidate / META_FILE).is_file():
            return candidate
    raise SoftshareError(f"{path} holds no checkpoint (no {MODEL_FILE}, checkpoints/best/ or checkpoints/last/); "
                         f"pass {_ACCEPTS}, or train the run first")


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's meta.json, checked, without reading a tensor (see `find_checkpoint` for
    the paths accepted): what a caller needs to decide before loading weights, or instead."""
    return _read_meta(find_checkpoint(path))


def _read_meta(directory: Path) -> dict[str, Any]:
    meta_path = directory / META_FILE
    fix = "re-save the checkpoint, or restore the directory from a backup"
    if not meta_path.is_file():
        raise SoftshareError(f"checkpoint {directory} has no {META_FILE}; {fix}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SoftshareError(f"{meta_path} is not valid JSON ({err}); {fix}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SoftshareError(f"{meta_path} is not a softshare checkpoint description "
                             f"(format is not {FORMAT!r}); pass {_ACCEPTS}")
    version = meta.get("version")
    if not isinstance(version, int) or version < 1:
        raise SoftshareError(f"{meta_path} has an invalid version {version!r}; {fix}")
    if version > VERSION:
        raise SoftshareError(f"checkpoint {directory} has format version {version}, newer than this softshare "
                             f"reads ({VERSION}); upgrade softshare")
    model = meta.get("model")
    foreign = isinstance(model, dict) and model.get("name") is None and isinstance(model.get("class"), str)
    if not isinstance(model, dict) or not (isinstance(model.get("name"), str) or foreign):
        raise SoftshareError(f"{meta_path} does not say which model it holds ('model' must be a dict with "
                             f"a 'name'); {fix}")
    aliases = meta.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise SoftshareError(f"{meta_path} has invalid 'aliases' (must map state-dict keys to stored keys, "
                             f"all strings); {fix}")
    banks = meta.get("banks", [])
    if not isinstance(banks, list) or not all(isinstance(b, dict) for b in banks):
        raise SoftshareError(f"{meta_path} has invalid 'banks' (must be a list of bank descriptions); {fix}")
    if meta.get("config") is not None and not isinstance(meta["config"], dict):
        raise SoftshareError(f"{meta_path} has an invalid 'config' (must be a dict of training settings or "
                             f"null); {fix}")
    return meta


def _read_weights(directory: Path, aliases: Mapping[str, str], map_location: str | torch.device) -> dict[str, Tensor]:
    model_path = directory / MODEL_FILE
    if not model_path.is_file():
        raise SoftshareError(f"checkpoint {directory} has no {MODEL_FILE}; re-save it or restore it from a backup")
    try:
        tensors = load_file(model_path, device=str(torch.device(map_location)))
    except (SafetensorError, OSError, ValueError) as err:
        raise SoftshareError(f"{model_path} is truncated or corrupt ({err}); re-save the checkpoint "
                             f"or restore it from a backup") from err
    missing = sorted({stored for stored in aliases.values() if stored not in tensors})
    if missing:
        raise SoftshareError(f"{model_path} lacks tensors its {META_FILE} refers to ({', '.join(missing[:3])}); "
                             f"the files do not belong together: re-save the checkpoint")
    tensors.update({alias: tensors[stored] for alias, stored in aliases.items()})
    return tensors


def _read_train_state(directory: Path, map_location: str | torch.device) -> dict[str, Any] | None:
    state_path = directory / STATE_FILE
    if not state_path.exists():
        return None
    try:
        state = torch.load(state_path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, disallowed global: all mean "unusable file"
        if is_refused_pickle(err):
            raise SoftshareError(refused_pickle_message(
                state_path, err, f"The weights in {MODEL_FILE} stay usable (eval, lsm and fold never read "
                f"{STATE_FILE}); delete {STATE_FILE} to keep only them, or restore it from a backup")) from err
        raise SoftshareError(f"{state_path} is truncated or corrupt ({_reason(err)}); delete it to start "
                             f"the training state afresh, or restore it from a backup") from err
    if not isinstance(state, dict):
        raise SoftshareError(f"{state_path} does not hold softshare training state (a dict); delete it, "
                             f"or restore it from a backup")
    return state


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    train_state: bool = True) -> Checkpoint:
    """Read a checkpoint (see `find_checkpoint` for accepted paths) without building a model.

    `train_state=False` skips state.pt, which can be larger than the weights and is only
    needed to resume training.
    """
    directory = find_checkpoint(path)
    meta = _read_meta(directory)
    state = _read_weights(directory, meta.get("aliases", {}), map_location)
    extra = _read_train_state(directory, map_location) if train_state else None
    return Checkpoint(_current_names(state, meta), meta, extra, directory)


def _current_names(state: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Tensor]:
    """The state dict (and meta's bank layer names, in place) under the module names the model's
    family uses today (`register_family(renamed=...)`): older checkpoints keep loading."""
    name = meta["model"].get("name")
    renamed = {key: current_name(name, key) for key in state}
    if all(key == new for key, new in renamed.items()):
        return state
    for bank in meta.get("banks", []):
        if isinstance(bank.get("layers"), list):
            bank["layers"] = [current_name(name, layer) if isinstance(layer, str) else layer
                              for layer in bank["layers"]]
    return {renamed[key]: tensor for key, tensor in state.items()}


# -- loading into models ------------------------------------------------------------------------
def _load_strict(model: nn.Module, checkpoint: Checkpoint, dry_run: bool = False) -> None:
    """load_state_dict(strict=True), but a mismatch becomes one readable SoftshareError
    (`dry_run`: only check keys and shapes, e.g. against a model on the meta device)."""
    expected = model.state_dict()
    given = checkpoint.state_dict
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in given and given[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{len(items)} {what} ({'; '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
                 for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches", shapes)) if items]
        if dry_run:  # the model was built from the checkpoint's own meta.json
            raise SoftshareError(f"checkpoint {checkpoint.path}: its {META_FILE} describes a model its {MODEL_FILE} "
                                 f"does not hold ({', '.join(parts)}); the files do not belong together: re-save "
                                 f"the checkpoint or restore it from a backup")
        theirs = checkpoint.meta["model"].get("name") or checkpoint.meta["model"].get("class")
        ours = (getattr(model, "softshare_config", None) or {}).get("name", type(model).__name__)
        raise SoftshareError(f"checkpoint {checkpoint.path} ({theirs}) does not fit this model ({ours}): "
                             f"{', '.join(parts)}; load it with softshare.load(path) to rebuild its own "
                             f"architecture, or build the model with the checkpoint's settings")
    if not dry_run:
        model.load_state_dict(given, strict=True)


def load_into(model: nn.Module, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint's weights strictly into an existing model; returns the checkpoint.

    The way to load a model softshare cannot rebuild by name (timm, transformers, your own):
    build it as before `share()` and pass it here. Its layers are first rewritten to the bank
    structure the checkpoint was saved with (what `share`, `tie` or `unshare` left), so a plain
    model gets its banks back; a model that already matches is left as it is (resume). A model
    of a registered architecture is rewritten only when it is the saved one (same config).
    """
    checkpoint = load_checkpoint(path, map_location)
    model = unwrap_model(model)
    saved = checkpoint.meta["model"]
    # only the saved architecture is rewritten (older checkpoints have no "banks": as it is)
    if "banks" in checkpoint.meta and (saved["name"] is None or getattr(model, "softshare_config", None) == saved):
        match_banks(model, checkpoint.meta["banks"])
    _load_strict(model, checkpoint)
    return checkpoint


def _corrupt_meta(path: Path, err: Exception) -> SoftshareError:
    return SoftshareError(f"cannot rebuild the model of checkpoint {path} from its {META_FILE} "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); the "
                          f"file is corrupt or from an incompatible softshare")


def build_model_for(checkpoint: Checkpoint) -> nn.Module:
    """Rebuild the architecture `checkpoint` describes, after proving on the meta device that
    it matches the stored tensors: sizes in meta.json never cause an allocation by themselves."""
    config = checkpoint.meta["model"]
    path = checkpoint.path
    if config["name"] is None:
        raise SoftshareError(f"checkpoint {path} holds a {config['class']}, which softshare cannot rebuild by "
                             f"name; build the model as you did before share() and call "
                             f"softshare.load_into(model, {str(path)!r})")

    def build() -> nn.Module:
        try:
            model = create_model(**config)
        except SoftshareError as err:
            raise SoftshareError(f"cannot rebuild the model of checkpoint {path}: {err}; import the module that "
                                 f"registers it first, or upgrade softshare") from err
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            raise _corrupt_meta(path, err) from err
        if "banks" in checkpoint.meta:  # saved after tie() or unshare(): the registered architecture changed
            try:
                match_banks(model, checkpoint.meta["banks"])
            except (TypeError, ValueError, RuntimeError, OverflowError, KeyError, AttributeError) as err:
                raise _corrupt_meta(path, err) from err
        return model

    with torch.device("meta"):
        skeleton = build()
    _load_strict(skeleton, checkpoint, dry_run=True)
    return build()


def load(path: str | os.PathLike | Checkpoint, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model a checkpoint was saved from, with its weights, in eval mode on `device`.

    `path` may be a `Checkpoint` already read (`load_checkpoint`), so a caller that needs its
    meta too reads the weights once."""
    checkpoint = path if isinstance(path, Checkpoint) else load_checkpoint(path, train_state=False)
    model = build_model_for(checkpoint)
    _load_strict(model, checkpoint)
    return model.to(device).eval()
