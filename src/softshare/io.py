"""Atomic file and directory writes: a crash never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, else delete it.

    Works for files and directories (a directory target replaces any existing one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    tmp = Path(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write `text` to `path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def rebuild_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build directory `path` in place (so files inside may record their final paths).

    A previous `path` is set aside and restored if the build fails, and a failed build is
    removed: afterwards `path` is either the old directory or the complete new one.
    """
    path = Path(path)
    previous = path.with_name(f".{path.name}.previous-{os.getpid()}")
    if path.exists():
        os.replace(path, previous)
    try:
        path.mkdir(parents=True)
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        if previous.exists():
            os.replace(previous, path)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100, **savefig_kwargs: Any) -> Path:
    """Atomically save a matplotlib `Figure` as PNG. Callers build figures with the object API
    (``matplotlib.figure.Figure``), never pyplot, so no global backend is switched."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, **savefig_kwargs)
    return path
