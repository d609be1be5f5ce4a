"""``ServeOptions``: what ``loraloom serve`` takes, and the command's flags made from its fields.

Each field that is a flag carries its help (and vLLM's name for it, where vLLM has a flag that means the same)
in its metadata, so the option, its default, its check and its flag are written once, here. No FastAPI here:
the CLI builds its parser from this module without loading the server.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..devices import resolve_device, resolve_dtype
from ..models import QUANTIZE
from .cache import check_adapter_name, check_cache_options
from .engine import check_max_batch


def flag(help: str, *names: str, default: Any = dataclasses.MISSING, **argparse_kwargs: Any) -> Any:
    """A ServeOptions field that is also a ``loraloom serve`` flag: ``--field-name`` and any more ``names``."""
    return field(default=default, metadata={"cli": [{"aliases": names, "help": help, **argparse_kwargs}]})


def named_adapters(items: list[str]) -> dict[str, str]:
    """``["name=folder-or-hub-id", ...]`` (``--adapter``, ``--lora-modules``) -> {name: source}; an item may also
    be vLLM's JSON form ``{"name": ..., "path": ...}``."""
    named = {}
    for item in items:
        if item.lstrip().startswith("{"):
            try:
                entry = json.loads(item)
                name, source = str(entry["name"]), str(entry["path"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"--lora-modules {item}: expected JSON with 'name' and 'path'") from e
        else:
            name, sep, source = item.partition("=")
            if not sep:
                name = ""
        if not name or not source:
            raise ValueError(f"--adapter {item}: expected NAME=FOLDER_OR_HUB_ID")
        named[name] = source
    return named


@dataclass
class ServeOptions:
    """What ``loraloom serve`` takes, checked before the model loads."""

    base: str | None = flag("base model (a causal LM, T5 or BART): a local folder or a hub id", default=None)
    adapters: str | None = flag("folder of adapter folders (a request's model names one)", default=None, metavar="DIR")
    zoo: bool = flag("serve the built-in demo world: its tiny T5 base and its LoRA modules (no --base, no --adapters)",
                     default=False)  # fmt: skip
    named: dict[str, str] = field(
        default_factory=dict,
        metadata={"cli": [  # more adapters by name -> folder or hub id, loaded on first use like the folder's
            {"names": ("--adapter",), "action": "append", "metavar": "NAME=SOURCE", "help": "one more adapter: "
             "a folder or hub id (repeatable)"},
            {"names": ("--lora-modules",), "action": "extend", "nargs": "+", "metavar": "NAME=PATH",
             "help": "vLLM's name for --adapter: several at once"},
        ]},
    )  # fmt: skip
    host: str = flag("address to listen on", default="127.0.0.1")
    port: int = flag("port to listen on", default=8000)
    # 64, not 32: on a CPU tokens/s is flat from 32 to 64 rows, and 64 streams then start in 0.3 s, not 2.5 s.
    max_batch: int = flag("rows decoded together at most; more requests wait", "--max-num-seqs",
                          default=64)  # fmt: skip
    max_loras: int | None = flag(
        "distinct adapters in the running batch at most (the base takes none); a request for another waits",
        default=None, type=int, metavar="N",
    )  # fmt: skip
    max_lora_rank: int | None = flag(
        "adapters of a higher rank are refused (400) when a request or POST loads them", default=None, type=int
    )
    cache_mib: float = flag("memory for loaded adapters (and composition banks), LRU", default=1024.0)
    ray_replicas: int = flag("0: one process; N: N replicas behind one endpoint with Ray Serve", default=0,
                             metavar="N")  # fmt: skip
    device: str = "auto"
    """Where the base runs: auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps (the shared --device)."""
    dtype: str = "auto"
    """The base's precision: fp32, bf16, fp16, or auto (the shared --dtype)."""
    quantize: str | None = flag("a weight-only quantized base: int8, or int4 on CUDA (torchao)",
                                default=None, choices=QUANTIZE)  # fmt: skip
    gpus_per_replica: float = flag("Ray Serve: GPUs each replica asks for (fractional allowed)", default=0.0)
    api_key: str | None = flag("every route but /health needs Authorization: Bearer KEY (default: $LORALOOM_API_KEY)",
                               default=None, env="LORALOOM_API_KEY")  # fmt: skip
    allow_adapter_management: bool = flag(
        "POST/DELETE /v1/adapters and POST /v1/load_lora_adapter, /v1/unload_lora_adapter", default=False
    )
    allow_path: tuple[str, ...] = flag("one more folder POSTed adapters may come from (repeatable)", default=(),
                                       action="append", metavar="DIR")  # fmt: skip
    allow_hub: bool = flag("a POSTed adapter may be a hub id to download", default=False)
    max_body_mib: float = flag("larger request bodies are refused (413)", default=8.0)

    def __post_init__(self) -> None:
        if self.zoo:
            from ..zoo.build import ARTIFACTS  # here, not at the top: the CLI builds its parser without the zoo

            given = [f"--{name}" for name in ("base", "adapters") if getattr(self, name) is not None]
            if given:
                raise ValueError(f"--zoo serves the zoo's base and modules: drop {' and '.join(given)}")
            self.base, self.adapters = str(ARTIFACTS / "base"), str(ARTIFACTS / "modules")
        if not self.base:
            raise ValueError("loraloom serve needs a model: --base FOLDER_OR_HUB_ID, or --zoo for the demo world")
        # Each component's own check, run here before the model loads.
        check_cache_options(self.adapters, self.cache_mib)
        check_max_batch(self.max_batch, self.max_loras, self.max_lora_rank)
        resolve_dtype(self.dtype, resolve_device(self.device))
        if not self.gpus_per_replica >= 0:
            raise ValueError(f"--gpus-per-replica must be >= 0, got {self.gpus_per_replica}")
        for name in self.named:
            check_adapter_name(name)
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        self.allow_path = tuple(self.allow_path or ())
        for folder in self.allow_path:
            if not Path(folder).is_dir():
                raise ValueError(f"--allow-path {folder}: not a directory")
        if not self.max_body_mib > 0:
            raise ValueError(f"--max-body-mib must be positive, got {self.max_body_mib}")
        if self.ray_replicas < 0:
            raise ValueError(f"--ray-replicas must be >= 0, got {self.ray_replicas}")


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One flag per ServeOptions field that has CLI metadata (``dest`` the field's name, so ``options_of`` finds
    it), with its default, type and help from the field; device and dtype come from the shared options."""
    for f in dataclasses.fields(ServeOptions):
        for spec in f.metadata.get("cli", ()):
            kwargs = {k: v for k, v in spec.items() if k not in ("names", "aliases", "env")}
            flags = spec.get("names") or [f"--{f.name.replace('_', '-')}", *spec["aliases"]]
            default = None if f.default is dataclasses.MISSING else f.default
            if isinstance(default, bool):
                kwargs.setdefault("action", "store_true")
            elif default is not None and "action" not in kwargs:
                kwargs.setdefault("type", type(default))
                kwargs["help"] += " (default: %(default)s)"
            if kwargs.get("action") in ("append", "extend"):
                default = None  # argparse appends to a fresh list
            if "env" in spec:  # never shown in --help: it may be a secret
                default = os.environ.get(spec["env"], default)
            parser.add_argument(*flags, dest=f.name, default=default, **kwargs)
    return parser


__all__ = ["ServeOptions", "add_serve_arguments", "flag", "named_adapters"]
