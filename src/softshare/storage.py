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
`recover_leftovers` (run by every writer over the directory it writes into, before it writes)
finishes that: it puts the old one back and deletes temporaries of writers no longer alive.

Outputs of jobs (`check_output`) carry a marker file naming what wrote them and the files it
wrote, so a job only ever replaces its own earlier output of the same kind, never a user's
files: ownership is proven by the marker (or by content, for outputs of versions before
markers), never by the names of the files a directory holds. A replacement keeps the files of
the old directory that the job did not write there (`atomic_path(keep_foreign=True)`,
`rebuild_dir`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
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
    if ``<name>`` is missing (a crash between the two renames) and deleted otherwise. A sibling
    ``.<name>.previous-<pid>`` (what `rebuild_dir` of earlier versions left beside its output)
    is put back unless ``<name>`` is a complete output; those `rebuild_dir` now leaves inside its
    output are `recover_output`'s. Temporary ``.<name>.<pid>.*.tmp`` of dead writers are
    deleted. `names` limits this to those targets.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    wanted = None if names is None else set(names)
    rebuilt = isinstance(_marker(directory).get("owned"), list)  # its .previous-<pid> are recover_output's
    done = []
    for entry in sorted(directory.iterdir()):
        match = _OLD.match(entry.name) or _TMP.match(entry.name)
        if not match or (wanted is not None and match["name"] not in wanted) or _alive(int(match["pid"])):
            continue
        if rebuilt and match.re is _OLD and match["how"] == "previous":
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
def atomic_path(path: str | os.PathLike, *, keep_foreign: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success make it `path` durably, else delete it.

    Works for files and directories (a directory target replaces any existing one). With
    `keep_foreign`, a directory replacing an existing one first receives (as hard links, else
    copies) the old one's entries that the job did not write (not listed in its output marker)
    and the new one does not hold: replacing an output never deletes a user's file beside it.
    See the module docstring for what a crash at any instant leaves behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_leftovers(path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp_name)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if keep_foreign and tmp.is_dir() and path.is_dir() and not path.is_symlink():
            _carry_over(path, tmp)
        crash_point("written", path)
        fsync_tree(tmp)
        crash_point("synced", path)
        _swap_into_place(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _carry_over(old: Path, new: Path) -> None:
    """Link (else copy) into `new` every entry of `old` the job did not write and `new` lacks."""
    ours = set(_marker(old).get("files", [])) | {OUTPUT_MARKER}
    for entry in old.iterdir():
        target = new / entry.name
        if entry.name in ours or os.path.lexists(target) or _TMP.match(entry.name) or _OLD.match(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


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


def mark_output(directory: str | os.PathLike, kind: str, complete: bool = True,
                files: Iterable[str] | None = None, **extra: Any) -> None:
    """Record that `directory` is a softshare output of `kind` and which of its entries the job
    wrote (default: everything there now), so a rerun may replace those and nothing else."""
    directory = Path(directory)
    if files is None:
        files = (p.name for p in directory.iterdir() if p.name != OUTPUT_MARKER and not _TMP.match(p.name))
    write_json(directory / OUTPUT_MARKER, {"kind": kind, "complete": complete, "files": sorted(files), **extra})


def check_output(path: str | os.PathLike, kind: str, *, overwrite: bool = False, flag: str | None = "--overwrite",
                 directory: bool = True, legacy: Callable[[Path], bool] | None = None,
                 protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse, before any work, to write a job's output where it would destroy something.

    Allowed without `overwrite`: a new path, an empty directory, or (`directory` outputs) a
    directory marked as this job's own output of the same `kind` (or one `legacy` proves, by
    its content, to be an output of a version before markers). Anything else (a file where a
    directory goes or the reverse, a symbolic link, a foreign directory, another kind's output,
    a path inside or around one of `protect`, e.g. the job's own source) is refused with one
    line naming it and `flag` (None: the job offers no way to replace, only a new path). The
    place must be writable. Returns `path` as a Path.
    """
    path = Path(path)
    recover_leftovers(path.parent)
    recover_output(path)
    resolved = path.resolve()
    for source in protect:
        source = Path(source).resolve()
        if not overwrite and (resolved == source or source.is_relative_to(resolved)
                              or resolved.is_relative_to(source)):
            raise SoftshareError(f"refusing to write the {kind} output to {path}: that would replace or write "
                                 f"into its own source {source}; choose another path"
                                 f"{f' (or pass {flag} to replace it)' if flag else ''}")
    if path.is_symlink():
        target = "a directory" if path.is_dir() else "a file" if path.exists() else "nothing"
        raise SoftshareError(f"refusing to write the {kind} output to {path}: it is a symbolic link (to {target}, "
                             f"{os.path.realpath(path)}); softshare does not write through links: pass the real "
                             f"path, or a new one")
    check_writable(path)
    if overwrite or not os.path.lexists(path):
        return path
    if directory:
        if path.is_dir():
            if not any(path.iterdir()) or output_kind(path) == kind or (
                    legacy is not None and output_kind(path) is None and legacy(path)):
                return path
            theirs = output_kind(path)
            what = f"a softshare {theirs} output" if theirs else "a directory this job did not write"
        else:
            what = "a file, not a directory"
    elif path.is_file():
        return path if _is_own_file(path, kind) else _refuse(path, kind, "a file this job did not write", flag)
    else:
        what = "a directory, not a file"
    return _refuse(path, kind, what, flag)


def check_writable(path: str | os.PathLike) -> None:
    """Refuse, before any work, an output whose nearest existing ancestor cannot be written into
    (read-only file system, no permission): found by creating and deleting a probe file there."""
    path = Path(path)
    parent = path.parent if not path.is_dir() or path.is_symlink() else path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SoftshareError(f"cannot write {path}: {parent} is a file, not a directory; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise SoftshareError(f"cannot write {path}: {describe_os_error(err, parent)}; choose another path, or fix "
                             f"the permissions of {parent}") from None


def describe_os_error(err: OSError, where: str | os.PathLike | None = None) -> str:
    """A failed write in words the user can act on (disk full, file-size limit, read-only...)."""
    reasons = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is used up",
               errno.EFBIG: "a file grew past the file-size limit (ulimit -f)",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.ENOMEM: "out of memory"}
    reason = reasons.get(err.errno) or err.strerror or str(err) or type(err).__name__
    where = where if where is not None else err.filename
    return f"{reason} ({where})" if where else reason


def _is_own_file(path: Path, kind: str) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(MAX_OWN_FILE + 1)
        return len(head) <= MAX_OWN_FILE and json.loads(head).get("softshare_output") == kind
    except (OSError, ValueError, AttributeError):
        return False


MAX_OWN_FILE = 64 << 20  # a JSON output of a job is never this large; a larger file is not read


def _refuse(path: Path, kind: str, what: str, flag: str | None) -> Path:
    raise SoftshareError(f"refusing to write the {kind} output to {path}: it exists and is {what}; choose a "
                         f"new path{f', or pass {flag} to replace it' if flag else ''}")


def _previous(path: Path, name: str, pid: int) -> Path:
    return path / f".{name}.previous-{pid}"


@contextlib.contextmanager
def rebuild_dir(path: str | os.PathLike, kind: str, owned: Iterable[str]) -> Iterator[Path]:
    """Build output directory `path` in place (so files inside may record their final paths).

    Only the job's own entries (`owned` names, and the marker) of a previous output are set
    aside, inside `path`, as ``.<name>.previous-<pid>``: deleted when the build is done, put back
    if it fails; the directory itself and the user's other files in it never move. The marker
    says "incomplete" (with the writer and its entries) until the build is done, so after a kill
    half-way `recover_output` puts the previous output back. Callers vet the target with
    `check_output` first.
    """
    path = Path(path)
    owned = sorted(set(owned) - {OUTPUT_MARKER})
    recover_output(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    for name in [OUTPUT_MARKER, *owned]:
        if os.path.lexists(path / name):
            os.replace(path / name, _previous(path, name, pid))
    fsync_path(path)
    try:
        write_json(path / OUTPUT_MARKER, {"kind": kind, "complete": False, "writer": pid, "owned": owned})
        crash_point("rebuilding", path)
        yield path
        fsync_tree(path)
        mark_output(path, kind, files=[n for n in owned if os.path.lexists(path / n)], owned=owned)
    except BaseException:
        _roll_back(path, owned, pid)
        if created and not any(path.iterdir()):
            path.rmdir()
        raise
    for name in [OUTPUT_MARKER, *owned]:
        _remove(_previous(path, name, pid))


def _roll_back(path: Path, owned: Iterable[str], pid: int) -> None:
    """Undo a half-done `rebuild_dir` of writer `pid`: its new entries go, the previous ones return."""
    for name in [*owned, OUTPUT_MARKER]:
        _remove(path / name)
        if os.path.lexists(_previous(path, name, pid)):
            os.replace(_previous(path, name, pid), path / name)
    fsync_path(path)


def recover_output(path: str | os.PathLike) -> bool:
    """Put back the previous output of a `rebuild_dir` whose writer died half-way; True if it did."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    marker = _marker(path)
    pid, owned = marker.get("writer"), marker.get("owned")
    if not isinstance(owned, list) or not all(isinstance(name, str) and "/" not in name for name in owned):
        return False
    if marker.get("complete") is True:  # finished, killed before deleting what it had set aside
        for entry in path.iterdir():
            match = _OLD.match(entry.name)
            if match and match["how"] == "previous" and match["name"] in {*owned, OUTPUT_MARKER} \
                    and not _alive(int(match["pid"])):
                _remove(entry)
        return False
    if not isinstance(pid, int) or _alive(pid):
        return False
    _roll_back(path, owned, pid)
    return True


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


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file: what an output records of the files it wrote beside it, to prove them its own."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- one writer per directory -------------------------------------------------------------------
@contextlib.contextmanager
def exclusive_lock(directory: str | os.PathLike, what: str, fix: str, *,
                   lock_file: str | os.PathLike | None = None) -> Iterator[None]:
    """Hold an OS lock (flock on ``<directory>/.lock``, or on `lock_file`) for the block: one writer.

    The kernel drops the lock when its holder dies, so a lock left by a killed process never
    blocks; a live holder makes this raise one line naming its PID (`what` names the directory
    to the user, `fix` says what to do instead). A `lock_file` (beside a single output) is
    deleted on release; the lock is taken only on the file still at that path, so a writer
    that finds it deleted under it tries again.
    """
    path = Path(lock_file) if lock_file is not None else Path(directory) / LOCK_FILE
    while True:
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
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # deleted by the holder that just released it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        if lock_file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        os.close(fd)  # releases the lock; the run's .lock stays (deleting it would race with a new holder)


def output_lock(path: str | os.PathLike, what: str) -> contextlib.AbstractContextManager[None]:
    """One writer for output `path` (a file or directory) at a time: a hidden lock file beside it,
    gone when the writer ends. A second writer is refused with the first one's PID."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return exclusive_lock(path, what, "wait for it to finish, or write somewhere else",
                          lock_file=path.with_name(f".{path.name}.lock"))
