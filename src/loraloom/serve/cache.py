"""The adapter cache: adapters loaded on first use into a bounded LRU, added and removed while serving.

Names resolve to a registered source (a folder or a hub id, ``add``) or to a subfolder of the adapters
directory (a folder dropped there while the server runs is found on first use). Each adapter is read as
``AdapterWeights`` (LoRA, DoRA, IA3 or FourierFT: safetensors or a legacy ``.bin`` through
``torch.load(weights_only=True)``, errors naming file, layer or field); LoraHub compositions read their
modules with the hub's bank reader.

Every use revalidates a cached folder by the (mtime_ns, size) of its adapter_config.json and weights file
(and their inode change time): a changed folder is read again, a deleted one is no longer served
(``UnknownAdapter``). Loads run outside the cache's lock, one per name at a time: reading adapter X never
blocks a request for a cached adapter Y, and two requests for X wait on the same read.

The limit counts the adapters' tensors (MiB). The least recently used adapters are dropped when a new one
does not fit; a request that still runs an evicted adapter keeps its own reference until it finishes.
A folder that fails to load raises ``AdapterError`` and is not cached (fix it, and the next use retries).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import NamedTuple

import torch

from ..adapters.base import AdapterError
from ..adapters.peft_format import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from ..hub.bank import ModuleBank, load_bank
from .multi import AdapterWeights

BASE = "base"  # the model name that means "no adapter"


class UnknownAdapter(KeyError):
    """A name that is neither registered nor a folder in the adapters directory."""

    def __str__(self) -> str:
        return str(self.args[0])


def check_cache_options(adapters_dir: str | os.PathLike | None, limit_mib: float) -> None:
    """The one check of the cache's options (``AdapterCache`` and ``ServeOptions`` call it)."""
    if not limit_mib > 0:
        raise ValueError(f"the adapter cache limit must be positive MiB, got {limit_mib}")
    if adapters_dir is not None and not Path(adapters_dir).is_dir():
        raise AdapterError(f"adapters directory {adapters_dir}: not a directory")


def check_adapter_name(name: str) -> None:
    """A name a request can use: not empty and not the base model's."""
    if not name or name == BASE:
        raise ValueError(f"adapter name {name!r} is reserved or empty")


HUB = "hub"  # a stamp ("hub", snapshot folder): a hub id, revalidated by the local snapshot it resolves to


def folder_stamp(source: str) -> tuple | None:
    """(mtime_ns, size) of a folder's config and weights files (None for a missing one). The inode change time
    too: a copy that kept the old files' mtimes (``cp -p``, ``shutil.copytree``) and their sizes is still a new file.

    A hub id: ("hub", the local snapshot folder its config resolves to), read from the local hub cache without
    a request, so a newer download (another revision) is seen; None when it is not downloaded."""
    folder = Path(source)
    if not folder.is_dir():
        return _hub_stamp(source)
    stamp = []
    for file in (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        try:
            st = (folder / file).stat()
            stamp.append((st.st_mtime_ns, st.st_size, st.st_ctime_ns))
        except OSError:
            stamp.append(None)
    return tuple(stamp)


def _hub_stamp(source: str) -> tuple | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, CONFIG_NAME)
    except ValueError:  # not a valid hub id (huggingface_hub's HFValidationError is a ValueError)
        return None
    return (HUB, str(Path(cached).parent)) if isinstance(cached, str) else None


class _Entry(NamedTuple):
    value: AdapterWeights | ModuleBank
    nbytes: int
    sources: tuple[str, ...]  # what it was read from
    stamp: tuple  # folder_stamp of each source, taken before the read


class AdapterCache:
    """Bounded LRU of adapters by name (thread-safe: the server loads from worker threads)."""

    def __init__(
        self,
        adapters_dir: str | os.PathLike | None = None,
        *,
        limit_mib: float = 1024.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        check_cache_options(adapters_dir, limit_mib)
        self.adapters_dir = Path(adapters_dir) if adapters_dir is not None else None
        self.limit_bytes = int(limit_mib * 2**20)
        self.dtype = dtype
        self.sources: dict[str, str] = {}  # registered with add(): name -> folder or hub id
        self.hidden: set[str] = set()  # folders of the adapters directory that remove() took out of service
        # ("adapter", name) -> AdapterWeights and ("bank", names) -> ModuleBank, least recently used first
        self._lru: OrderedDict[tuple, _Entry] = OrderedDict()
        # Guards the maps above and below, never held while a file is read.
        self._lock = threading.RLock()
        self._loading: dict[tuple, Future] = {}  # key -> the read in progress, which other requests wait on
        self.loads = 0  # files read so far (tests check that a cached adapter is not read again)

    # ---- names -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Every adapter that can be served: registered ones and the adapters directory's subfolders."""
        found = set(self.sources)
        if self.adapters_dir is not None:
            found |= {p.parent.name for p in self.adapters_dir.glob(f"*/{CONFIG_NAME}")} - self.hidden
        return sorted(found)

    def source(self, name: str) -> str:
        """The folder or hub id behind ``name``; ``UnknownAdapter`` if there is none (or its folder is gone)."""
        if name in self.sources:
            source = self.sources[name]
            if Path(source).is_absolute() and not Path(source).is_dir():  # a path, never a hub id: deleted
                raise UnknownAdapter(f"adapter {name!r} not found: its folder was deleted")
            return source
        if self.adapters_dir is not None and _plain_name(name) and name not in self.hidden:
            folder = self.adapters_dir / name
            if (folder / CONFIG_NAME).is_file():
                return str(folder)
        raise UnknownAdapter(f"adapter {name!r} not found (known: {', '.join(self.names()) or 'none'})")

    def add(self, name: str, source: str | os.PathLike, *, load: bool = True) -> None:
        """Register ``source`` (folder or hub id) as ``name``; by default load it now so errors show at once."""
        check_adapter_name(name)
        with self._lock:
            self.hidden.discard(name)
            old = self.sources.get(name)
            self.sources[name] = str(source)
            self._drop(name)
        if not load:
            return
        try:
            self.get(name)
        except Exception:
            with self._lock:
                if self.sources.get(name) == str(source):  # not re-registered meanwhile
                    if old is None:
                        del self.sources[name]
                    else:
                        self.sources[name] = old
            raise

    def remove(self, name: str) -> None:
        """Stop serving ``name``: forgotten, and a folder of the adapters directory is hidden (its files stay)
        until ``add`` registers the name again."""
        with self._lock:
            if name not in self.sources and ("adapter", name) not in self._lru:
                self.source(name)  # raises UnknownAdapter for a name never seen
            self.sources.pop(name, None)
            self.hidden.add(name)
            self._drop(name)

    def _drop(self, name: str) -> None:
        for key in [k for k in self._lru if k == ("adapter", name) or (k[0] == "bank" and name in k[1])]:
            del self._lru[key]

    # ---- loading -----------------------------------------------------------------------------

    def get(self, name: str) -> AdapterWeights:
        """The adapter ``name``, loaded on first use and reloaded when its folder changed (``UnknownAdapter``,
        ``UnservableAdapter`` naming a field, or ``AdapterError`` naming the file)."""
        return self._cached(("adapter", name), [name], lambda sources: self._read_adapter(name, sources[0]))

    def bank(self, names: Sequence[str]) -> ModuleBank:
        """The named adapters stacked as one hub bank (same rank and layers), cached like an adapter."""
        return self._cached(("bank", tuple(names)), list(names), lambda sources: self._read_bank(list(names), sources))

    def compose(self, weights: dict[str, float]) -> AdapterWeights:
        """LoraHub without a merge: the adapter Σ w_i·A_i, Σ w_i·B_i over the named modules."""
        if not weights:
            raise ValueError("lorahub_weights: give at least one module and its weight")
        names = sorted(weights)
        bank = self.bank(names)
        w = bank.check_weights([weights[n] for n in names], source="lorahub_weights")
        label = "+".join(f"{weights[n]:g}*{n}" for n in names)
        return AdapterWeights.from_bank(bank, w, name=f"lorahub({label})")

    def _read_adapter(self, name: str, source: str) -> AdapterWeights:
        try:
            value = AdapterWeights.from_folder(source, name, dtype=self.dtype)
        except AdapterError:
            raise
        except (OSError, ValueError, RuntimeError) as e:  # a broken file must not take the server down
            raise AdapterError(f"adapter {name}: failed to load: {e}") from e
        with self._lock:
            self.loads += 1
        return value

    def _read_bank(self, names: list[str], sources: list[str]) -> ModuleBank:
        try:
            bank = load_bank(sources, dtype=self.dtype)
        except AdapterError:
            raise
        except (OSError, ValueError, RuntimeError) as e:
            raise AdapterError(f"adapter {', '.join(names)}: failed to load: {e}") from e
        bank.names = list(names)
        with self._lock:
            self.loads += len(names)
        return bank

    def _cached(self, key: tuple, names: list[str], load: Callable[[list[str]], AdapterWeights | ModuleBank]):
        """The cached value of ``key`` if its folders are unchanged, else ``load(sources)`` (once per key at a
        time: a second caller waits for the first one's read, other keys do not wait at all)."""
        sources = []
        for name in names:  # UnknownAdapter before any file is read
            try:
                sources.append(self.source(name))
            except UnknownAdapter:
                with self._lock:
                    self._drop(name)  # deleted or removed: free its memory too
                raise
        stamp = tuple(folder_stamp(s) for s in sources)  # stat calls, outside the lock
        with self._lock:
            hit = self._lru.get(key)
            if hit is not None and hit.sources == tuple(sources):
                if hit.stamp == stamp:
                    self._lru.move_to_end(key)
                    return hit.value
                gone = [
                    n for n, old, new in zip(names, hit.stamp, stamp, strict=True)
                    if old and old[0] != HUB and new is None
                ]  # fmt: skip
                if gone:  # read from a folder that is no longer there (a relative path, which is no hub id either)
                    self._drop(gone[0])
                    raise UnknownAdapter(f"adapter {gone[0]!r} not found: its folder was deleted")
            flight = self._loading.get(key)
            owner = flight is None
            if owner:
                flight = self._loading[key] = Future()
        if not owner:
            return flight.result()  # the same read's value or error
        try:
            value = load(sources)
            self._insert(key, names, _Entry(value, _nbytes(value), tuple(sources), stamp))
            flight.set_result(value)
            return value
        except BaseException as e:
            flight.set_exception(e)
            raise
        finally:
            with self._lock:
                del self._loading[key]

    def _insert(self, key: tuple, names: list[str], entry: _Entry) -> None:
        if entry.nbytes > self.limit_bytes:
            raise AdapterError(
                f"{key[0]} {key[1]}: needs {entry.nbytes / 2**20:.1f} MiB, more than the cache limit of "
                f"{self.limit_bytes / 2**20:.1f} MiB"
            )
        with self._lock:
            try:
                current = tuple(self.source(n) for n in names)
            except UnknownAdapter:
                current = None
            if current != entry.sources:  # removed or re-registered while it was read: serve it, do not keep it
                return
            self._lru.pop(key, None)
            while self._lru and self.nbytes + entry.nbytes > self.limit_bytes:
                self._lru.popitem(last=False)  # the least recently used goes first
            self._lru[key] = entry

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held (adapters and banks)."""
        with self._lock:
            return sum(e.nbytes for e in self._lru.values())

    def cached(self) -> list[str]:
        """Adapter names currently in memory, least recently used first."""
        with self._lock:
            return [k[1] for k in self._lru if k[0] == "adapter"]


def _nbytes(value: AdapterWeights | ModuleBank) -> int:
    if isinstance(value, AdapterWeights):
        return value.nbytes
    return sum(value.A[n].nbytes + value.B[n].nbytes for n in value.layers)


def _plain_name(name: str) -> bool:
    """A folder name inside the adapters directory: no path separators, no '..' (requests are untrusted)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\x00" not in name


__all__ = ["BASE", "AdapterCache", "UnknownAdapter", "folder_stamp"]
