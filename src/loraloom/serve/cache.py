"""The adapter cache: LoRA adapters loaded on first use into a bounded LRU, added and removed while serving.

Names resolve to a registered source (a folder or a hub id, ``add``) or to a subfolder of the adapters
directory (a folder dropped there while the server runs is found on first use). Each adapter is read
with the hub's bank reader (``load_bank``: safetensors or a legacy ``.bin`` through
``torch.load(weights_only=True)``, LoRA only, errors naming file and layer) and kept as ``LoraWeights``.

The limit counts the adapters' tensors (MiB). The least recently used adapters are dropped when a new one
does not fit; a request that still runs an evicted adapter keeps its own reference until it finishes.
A folder that fails to load raises ``AdapterError`` and is not cached (fix it, and the next use retries).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from ..adapters.base import AdapterError
from ..adapters.peft_format import CONFIG_NAME
from ..hub.bank import ModuleBank, load_bank
from .multi import LoraWeights

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


class AdapterCache:
    """Bounded LRU of LoRA adapters by name (thread-safe: the server loads from worker threads)."""

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
        # ("adapter", name) -> LoraWeights and ("bank", names) -> ModuleBank, least recently used first
        self._lru: OrderedDict[tuple, tuple[LoraWeights | ModuleBank, int]] = OrderedDict()
        self._lock = threading.RLock()
        self.loads = 0  # files read so far (tests check that a cached adapter is not read again)

    # ---- names -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Every adapter that can be served: registered ones and the adapters directory's subfolders."""
        found = set(self.sources)
        if self.adapters_dir is not None:
            found |= {p.parent.name for p in self.adapters_dir.glob(f"*/{CONFIG_NAME}")} - self.hidden
        return sorted(found)

    def source(self, name: str) -> str:
        """The folder or hub id behind ``name``; ``UnknownAdapter`` if there is none."""
        if name in self.sources:
            return self.sources[name]
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
            if load:
                try:
                    self.get(name)
                except Exception:
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

    def get(self, name: str) -> LoraWeights:
        """The adapter ``name``, loaded on first use (``UnknownAdapter``, or ``AdapterError`` naming the file)."""
        with self._lock:
            return self._cached(("adapter", name), lambda: LoraWeights.from_bank(self._read([name]), name=name))

    def bank(self, names: Sequence[str]) -> ModuleBank:
        """The named adapters stacked as one hub bank (same rank and layers), cached like an adapter."""
        with self._lock:
            return self._cached(("bank", tuple(names)), lambda: self._read(list(names)))

    def compose(self, weights: dict[str, float]) -> LoraWeights:
        """LoraHub without a merge: the adapter Σ w_i·A_i, Σ w_i·B_i over the named modules."""
        if not weights:
            raise ValueError("lorahub_weights: give at least one module and its weight")
        names = sorted(weights)
        bank = self.bank(names)
        w = bank.check_weights([weights[n] for n in names], source="lorahub_weights")
        label = "+".join(f"{weights[n]:g}*{n}" for n in names)
        return LoraWeights.from_bank(bank, w, name=f"lorahub({label})")

    def _read(self, names: list[str]) -> ModuleBank:
        sources = [self.source(n) for n in names]  # UnknownAdapter before any file is read
        try:
            bank = load_bank(sources, dtype=self.dtype)
        except AdapterError:
            raise
        except (OSError, ValueError, RuntimeError) as e:  # a broken file must not take the server down
            raise AdapterError(f"adapter {', '.join(names)}: failed to load: {e}") from e
        bank.names = list(names)
        self.loads += len(names)
        return bank

    def _cached(self, key: tuple, load):
        hit = self._lru.get(key)
        if hit is not None:
            self._lru.move_to_end(key)
            return hit[0]
        value = load()
        nbytes = value.nbytes if isinstance(value, LoraWeights) else _bank_nbytes(value)
        if nbytes > self.limit_bytes:
            raise AdapterError(
                f"{key[0]} {key[1]}: needs {nbytes / 2**20:.1f} MiB, more than the cache limit of "
                f"{self.limit_bytes / 2**20:.1f} MiB"
            )
        while self._lru and self.nbytes + nbytes > self.limit_bytes:
            self._lru.popitem(last=False)  # the least recently used goes first
        self._lru[key] = (value, nbytes)
        return value

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held (adapters and banks)."""
        with self._lock:
            return sum(n for _, n in self._lru.values())

    def cached(self) -> list[str]:
        """Adapter names currently in memory, least recently used first."""
        with self._lock:
            return [k[1] for k in self._lru if k[0] == "adapter"]


def _bank_nbytes(bank: ModuleBank) -> int:
    return sum(bank.A[n].nbytes + bank.B[n].nbytes for n in bank.layers)


def _plain_name(name: str) -> bool:
    """A folder name inside the adapters directory: no path separators, no '..' (requests are untrusted)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\x00" not in name


__all__ = ["BASE", "AdapterCache", "UnknownAdapter"]
