"""Small trained nets that ship with softshare: ``softshare.load("pretrained:NAME")`` and
``softshare eval pretrained:NAME`` work offline.

Each net is an ordinary checkpoint directory (``model.safetensors`` + ``meta.json``) in this
package, tens of KB each, trained by the command its ``meta.json`` config records; ``CATALOGUE``
(``catalogue.json``) says what each one scores and on what, and a test checks that it still does.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SoftshareError, unknown_name

PREFIX = "pretrained:"
HERE = Path(__file__).resolve().parent


def catalogue() -> dict[str, dict]:
    """name -> what the net is, how it was trained and what it scores (see catalogue.json)."""
    path = HERE / "catalogue.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def is_pretrained(name: object) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def pretrained_name(name: str) -> str:
    """NAME of ``pretrained:NAME`` (NAME itself unchanged)."""
    return name[len(PREFIX):] if is_pretrained(name) else name


def pretrained_path(name: str) -> Path:
    """The checkpoint directory of ``pretrained:NAME`` (or of NAME)."""
    key = pretrained_name(name)
    known = catalogue()
    if key not in known:
        raise unknown_name("pretrained net", key, known)
    path = HERE / key
    if not (path / "model.safetensors").is_file():
        raise SoftshareError(f"pretrained net {key!r} is listed but its files are missing from {path}; "
                             f"reinstall softshare")
    return path


__all__ = ["PREFIX", "catalogue", "is_pretrained", "pretrained_name", "pretrained_path"]
