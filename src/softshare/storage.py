"""Crash-safe writes: a crash at any instant leaves either the old output or the complete new one.

Protocol of `atomic_path` (files and directories alike):

1. the new output is written to a temporary sibling ``.<name>.<pid>.<random>.tmp``;
2. every file in it and the temporary directory itself are fsynced;
3. it is swapped into place: over a directory with one ``renameat2(RENAME_EXCHANGE)`` where
   the kernel offers it, else ``<name>`` -> ``.<name>.old-<pid>`` then temporary -> ``<name>``;
   over a file (or nothing) with one ``rename``;
4. the parent directory is fsynced, then the old version is deleted.

A writer killed at any point leaves ``<name>`` complete (old or new), or, only inside the
fallback's two renames, missing with the complete old one at ``.<name>.old-<pid>``.
`recover_leftovers` (run by every writer before it writes) finishes that: it puts the old one
back and deletes temporaries of writers that are no longer alive.

Outputs of jobs (`check_output`) carry a marker file naming what wrote them, so a job only ever
replaces its own earlier output of the same kind, never a user's files.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import SoftshareError

CRASH_ENV = "SOFTSHARE_CRASH_AT"  # test hook: "point" or "point@name" makes the process _exit there
NO_EXCHANGE_ENV = "SOFTSHARE_NO_RENAME_EXCHANGE"  # test hook: "1" forces the two-rename fallback
OUTPUT_MARKER = ".softshare-output.json"
LOCK_FILE = ".lock"
_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.\w+\.tmp$")
_OLD = re.compile(r"^\.(?P<name>.+)\.(?P<how>old|previous)-(?P<pid>\d+)$")


def crash_point(point: str, target: Path | None = None) -> None:
    """Die on the spot (``os._exit``, no cleanup) when the crash-test hook names `point`.

    The kill-torture test sets ``SOFTSHARE_CRASH_AT=point`` (or ``point@name`` to hit only
    writes of a target called `name`) to stop a real writer at a precise instant of a save.
    """
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    name, _, where = spec.partition("@")
    if name == point and (not where or (target is not None and target.name == where)):
        os._exit(86)


# -- durability ---------------------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    """Flush a file's or directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems cannot fsync directories: nothing more to do there
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file below `path` (a file or directory), then the directories, deepest first."""
    if not path.is_dir() or path.is_symlink():
        fsync_path(path)
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                fsync_path(Path(root, name))
        fsync_path(Path(root))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported here."""
    if os.environ.get(NO_EXCHANGE_ENV) == "1":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def recover_leftovers(directory: str | os.PathLike, names: Iterable[str] | None = None) -> list[str]:
    """Finish what dead writers left in `directory`; returns what was done, one phrase each.

    A ``.<name>.old-<pid>`` of a dead writer is the complete previous version: it is put back
    if ``<name>`` is missing (a crash between the two renames) and deleted otherwise. A
    ``.<name>.previous-<pid>`` (`rebuild_dir`) is put back unless ``<name>`` is a complete
    output. Temporary ``.<name>.<pid>.*.tmp`` of dead writers are deleted. `names` limits this
    to those targets.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    wanted = None if names is None else set(names)
    done = []
    for entry in sorted(directory.iterdir()):
        match = _OLD.match(entry.name) or _TMP.match(entry.name)
        if not match or (wanted is not None and match["name"] not in wanted) or _alive(int(match["pid"])):
            continue
        target = directory / match["name"]
        previous = match.re is _OLD and match["how"] == "previous"
        if previous and os.path.lexists(target) and not output_complete(target):
            _remove(target)  # a build killed half-way
        if match.re is _OLD and not os.path.lexists(target):
            os.replace(entry, target)
            done.append(f"restored {target} from an interrupted replacement")
        else:
            _remove(entry)
            done.append(f"removed {entry.name} left by an interrupted write")
    if done:
        fsync_path(directory)
    return done


# -- atomic replacement -------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success make it `path` durably, else delete it.

    Works for files and directories (a directory target replaces any existing one). See the
    module docstring for what a crash at any instant leaves behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_leftovers(path.parent, [path.name])
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp_name)
    tmp = Path(tmp_name)
    try:
        yield tmp
        crash_point("written", path)
        fsync_tree(tmp)
        crash_point("synced", path)
        _swap_into_place(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Make the complete, synced `tmp` become `path`, keeping the old one until that is durable."""
    if path.is_dir() and not path.is_symlink():
        if _exchange(tmp, path):  # tmp now holds the old directory
            fsync_path(path.parent)
            crash_point("swapped", path)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        crash_point("half-swapped", path)
        os.replace(tmp, path)
        fsync_path(path.parent)
        crash_point("swapped", path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
        fsync_path(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write `text` to `path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# -- outputs of jobs: never clobber what the user had ------------------------------------------
def _marker(path: Path) -> dict:
    try:
        marker = json.loads((path / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def output_kind(path: Path) -> str | None:
    """The kind of softshare output directory `path` is (its marker), or None."""
    kind = _marker(path).get("kind")
    return kind if isinstance(kind, str) else None


def output_complete(path: Path) -> bool:
    """Whether output directory `path` was finished (its marker says so)."""
    return _marker(path).get("complete") is True


def mark_output(directory: str | os.PathLike, kind: str, complete: bool = True) -> None:
    """Record that `directory` is a softshare output of `kind` (so a rerun may replace it)."""
    write_json(Path(directory) / OUTPUT_MARKER, {"kind": kind, "complete": complete})


def check_output(path: str | os.PathLike, kind: str, *, overwrite: bool = False, flag: str | None = "--overwrite",
                 directory: bool = True, legacy: tuple[str, ...] = (),
                 protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse, before any work, to write a job's output where it would destroy something.

    Allowed without `overwrite`: a new path, an empty directory, or (`directory` outputs) a
    directory marked as this job's own output of the same `kind` (or holding every file named
    in `legacy`, how older versions' outputs are recognised). Anything else (a file where a
    directory goes or the reverse, a foreign directory, another kind's output, a path inside
    or around one of `protect`, e.g. the job's own source) is refused with one line naming it
    and `flag` (None: the job offers no way to replace, only a new path). Returns `path` as a Path.
    """
    path = Path(path)
    recover_leftovers(path.parent, [path.name])
    resolved = path.resolve()
    for source in protect:
        source = Path(source).resolve()
        if not overwrite and (resolved == source or source.is_relative_to(resolved)
                              or resolved.is_relative_to(source)):
            raise SoftshareError(f"refusing to write the {kind} output to {path}: that would replace or write "
                                 f"into its own source {source}; choose another path"
                                 f"{f' (or pass {flag} to replace it)' if flag else ''}")
    if overwrite or not os.path.lexists(path):
        return path
    if directory:
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()) or output_kind(path) == kind \
                    or (legacy and all((path / name).exists() for name in legacy)):
                return path
            theirs = output_kind(path)
            what = f"a softshare {theirs} output" if theirs else "a directory this job did not write"
        else:
            what = "a file, not a directory"
    elif path.is_file() and not path.is_symlink():
        return path if _is_own_file(path, kind) else _refuse(path, kind, "a file this job did not write", flag)
    else:
        what = "a directory, not a file"
    return _refuse(path, kind, what, flag)


def _is_own_file(path: Path, kind: str) -> bool:
    try:
        return json.loads(path.read_text()).get("softshare_output") == kind
    except (OSError, ValueError, AttributeError):
        return False


def _refuse(path: Path, kind: str, what: str, flag: str | None) -> Path:
    raise SoftshareError(f"refusing to write the {kind} output to {path}: it exists and is {what}; choose a "
                         f"new path{f', or pass {flag} to replace it' if flag else ''}")


@contextlib.contextmanager
def rebuild_dir(path: str | os.PathLike, kind: str) -> Iterator[Path]:
    """Build output directory `path` in place (so files inside may record their final paths).

    A previous `path` is set aside as ``.<name>.previous-<pid>`` and restored if the build
    fails. The marker says "incomplete" until the build is done, so after a kill half-way
    `recover_leftovers` puts the previous directory back. Callers vet the target with
    `check_output` first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_leftovers(path.parent, [path.name])
    previous = path.with_name(f".{path.name}.previous-{os.getpid()}")
    if path.exists():
        os.replace(path, previous)
    try:
        path.mkdir(parents=True)
        mark_output(path, kind, complete=False)
        yield path
        fsync_tree(path)
        mark_output(path, kind)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(previous):
            os.replace(previous, path)
        raise
    shutil.rmtree(previous, ignore_errors=True)


FIGURE_FORMATS = ("png", "pdf", "svg")  # every figure-writing job's --format; png is the default
PNG_DPI = 200  # sharp in a paper or on a high-density screen; pdf and svg are vector


def check_figure_format(figure_format: str) -> str:
    """`figure_format` if it is one of FIGURE_FORMATS; else one line naming the valid ones."""
    if figure_format not in FIGURE_FORMATS:
        raise SoftshareError(f"figure format must be one of {', '.join(FIGURE_FORMATS)}, got {figure_format!r}")
    return figure_format


def figure_path(stem: str | os.PathLike, figure_format: str = "png") -> Path:
    """``<stem>.<figure_format>`` (one of FIGURE_FORMATS); the stem may contain dots."""
    check_figure_format(figure_format)
    stem = Path(stem)
    return stem.with_name(f"{stem.name}.{figure_format}")


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = PNG_DPI, **savefig_kwargs: Any) -> Path:
    """Atomically save a matplotlib `Figure` in the format its suffix names (.png at `dpi`, or
    vector .pdf/.svg). Callers build figures with the object API (``matplotlib.figure.Figure``),
    never pyplot, so no global backend is switched."""
    path = Path(path)
    figure_format = path.suffix.lstrip(".").lower()
    if figure_format not in FIGURE_FORMATS:
        raise SoftshareError(f"cannot save a figure as {path.name}: use a .png, .pdf or .svg name")
    metadata = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None},
                "svg": {"Date": None}}[figure_format]  # the same figure gives the same bytes
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=figure_format, dpi=dpi, metadata=metadata, **savefig_kwargs)
    return path


# -- one writer per directory -------------------------------------------------------------------
@contextlib.contextmanager
def exclusive_lock(directory: str | os.PathLike, what: str, fix: str) -> Iterator[None]:
    """Hold an OS lock (flock on ``<directory>/.lock``) for the block: one writer per directory.

    The kernel drops the lock when its holder dies, so a lock left by a killed process never
    blocks; a live holder makes this raise one line naming its PID (`what` names the directory
    to the user, `fix` says what to do instead).
    """
    path = Path(directory) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SoftshareError(f"{what} {directory} is in use by another softshare process (PID {holder}); "
                             f"{fix}") from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (deleting it would race with a new holder)
