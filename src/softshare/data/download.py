"""Fetching, checksum verification and safe tar extraction for dataset downloads.

Nothing here ever leaves a partial file at its final location: downloads land in temporary
paths that are renamed only once verified, and the caller's temporary directory takes the rest.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from ..errors import SoftshareError

TIMEOUT_S = 60


def fetch(url: str, dest: Path) -> None:
    """Stream `url` into the file `dest` (urllib, so file:// URLs work too)."""
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, dest: Path, hint: str, md5: str | None = None) -> None:
    """Fetch `url` to `dest`, checking `md5` when given; `hint` tells the user how to do it by hand.

    `dest` should be inside a temporary directory: on failure it may hold a partial file.
    """
    try:
        fetch(url, dest)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise SoftshareError(f"could not download {url} ({reason}); {hint}") from e
    if md5 is not None:
        got = md5sum(dest)
        if got != md5:
            raise SoftshareError(f"{url} downloaded with MD5 {got}, expected {md5} (corrupt or "
                                 f"changed download); {hint}")


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse any member that could write outside the extraction directory or is not plain data."""
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise SoftshareError(f"{archive} has an unsafe member path {member.name!r}; refusing to extract "
                             f"it, delete the archive and download it again from the official source")
    if not (member.isfile() or member.isdir()):
        raise SoftshareError(f"{archive} member {member.name!r} is a link or special file; refusing to "
                             f"extract it, delete the archive and download it again from the official source")


def safe_extract(archive: Path, target: Path) -> None:
    """Extract the regular files and directories of a tar archive under `target`, checked one by one.

    Raises SoftshareError on an absolute path, a `..` component, a link or a device member, or a
    corrupt archive; `target` should be a temporary directory the caller removes on failure.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                _check_member(member, archive)
                dest = target.joinpath(*PurePosixPath(member.name).parts)
                if member.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, length=1 << 20)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise SoftshareError(f"{archive} is not a readable tar archive ({e}); delete it and download "
                             f"it again") from e
