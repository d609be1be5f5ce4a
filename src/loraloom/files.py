"""Writes that never leave half a file or half a folder, and file hashes.

Every writer in loraloom goes through ``atomic_write`` (one file) or ``atomic_folder`` (a whole folder): a
reader sees the old content or the new, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, whole: bool = False) -> Iterator[Path]:
    """Write a whole folder at once: yields a temp folder beside ``path`` to fill, then swaps it in.

    On an exception the temp folder is deleted and ``path`` is left exactly as it was. On success,
    entries of the old folder that the new one does not have are carried over (a folder may hold more
    than what this save writes) unless ``whole`` says the new folder is all of it, the old folder is renamed aside, the new one renamed into place, and the
    old one deleted. Each rename is atomic; a crash between the two leaves the old folder complete under
    ``.<name>.old-*`` beside ``path``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: expected a folder to write into, found a file")
    if path.resolve() in (Path.cwd().resolve(), Path(path.resolve().anchor)):
        raise ValueError(f"{path}: refusing to replace the current folder or a filesystem root; name a subfolder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        if path.is_dir():
            for entry in [] if whole else path.iterdir():
                if not (tmp / entry.name).exists():
                    os.rename(entry, tmp / entry.name)
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.rename(path, old / path.name)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_of(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["atomic_folder", "atomic_write", "sha256_of"]
