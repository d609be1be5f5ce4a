"""Writes that never leave half a file or half a folder, never touch a file they do not own, and file hashes.

Every writer in loraloom goes through ``atomic_write`` (one file) or ``atomic_folder`` (a whole folder): a
reader sees the old content or the new, never a mix, and a kill -9 at any moment leaves one of the two
complete under its own name. Temp names carry the writer's pid, so the next writer can tell a dead
writer's leftovers (removed on entry) from a live one's.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import glob
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file."""
    path = _write_through(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, owns: Iterable[str] = ()) -> Iterator[Path]:
    """Write a whole folder at once: yields a temp folder beside ``path`` to fill, then swaps it in.

    The save owns what it writes plus the names matching ``owns`` (glob patterns, e.g. the files of an
    earlier result it replaces: ``("trace.png", "merged")``); those are replaced or removed, so the folder
    never mixes two results. Everything else in the old folder (a user's notes, other adapters) is
    hard-linked into the new one (copied where links fail), so it is never moved and stays in place
    whatever happens. The swap is one ``renameat2(RENAME_EXCHANGE)`` where the filesystem has it; elsewhere
    two renames, and a writer killed between them is repaired by the next one. On an exception the temp
    folder is deleted and ``path`` is left exactly as it was. A symlinked ``path`` is written through.
    """
    path = _write_through(Path(path))
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: expected a folder to write into, found a file")
    if path in (Path.cwd().resolve(), Path(path.anchor)):
        raise ValueError(f"{path}: refusing to replace the current folder or a filesystem root; name a subfolder")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    owns = tuple(owns)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-"))
    try:
        yield tmp
        if not path.is_dir():
            os.rename(tmp, path)
            return
        for entry in path.iterdir():
            if not (tmp / entry.name).exists() and not any(fnmatch.fnmatch(entry.name, p) for p in owns):
                _link_tree(entry, tmp / entry.name)
        if not _exchange(tmp, path):  # no atomic swap here: old aside, new in; remove_stale repairs a kill between
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-{os.getpid()}-"))
            os.rename(path, old / path.name)
            os.rename(tmp, path)
            tmp = old
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the new folder on an error, the old one (links only) on success


def check_writable(path: str | os.PathLike) -> None:
    """Fail now, not after hours of work, when ``path`` (a folder to be written) cannot be: it, or its
    nearest existing parent, must be a writable folder."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{path}: cannot be written: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot be written: no write permission in {existing}")


def remove_stale(path: Path) -> None:
    """Remove what dead writers left beside ``path``, and put back an old folder a writer died swapping out."""
    for kind in ("tmp", "old"):
        for leftover in path.parent.glob(f".{glob.escape(path.name)}.{kind}-*"):
            pid = leftover.name[len(path.name) + len(kind) + 3 :].split("-")[0]
            if pid.isdigit() and _alive(int(pid)):
                continue
            if kind == "old" and not path.exists() and (leftover / path.name).is_dir():
                os.rename(leftover / path.name, path)
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _write_through(path: Path) -> Path:
    """The real path: a symlinked target (or parent) is written where it points, the link left as it is."""
    return Path(os.path.realpath(path))


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link ``src`` (a file, a symlink or a folder, recursively) at ``dst``; copy where links fail."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        for child in src.iterdir():
            _link_tree(child, dst / child.name)
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where the system cannot."""
    renameat2 = getattr(libc(), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def libc() -> ctypes.CDLL | None:
    """The C library (for calls Python has no wrapper for), or None where it cannot be opened."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def sha256_of(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["atomic_folder", "atomic_write", "check_writable", "libc", "remove_stale", "sha256_of"]
