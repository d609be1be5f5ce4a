"""``loraloom zoo verify``: the shipped zoo is complete, unchanged and loads.

Checks, in order, each failure a ``ZooError`` naming the file: the manifest reads; every file it lists
exists with its SHA-256; no file is there that it does not list; every weight file is half precision;
the base loads with ``AutoModelForSeq2SeqLM`` / ``AutoTokenizer``; every module reads as a PEFT LoRA
folder of the manifest's rank and targets; held-out tasks have no module and no upstream name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..adapters import read_adapter
from ..files import sha256_of
from .build import ARTIFACTS, MANIFEST


class ZooError(ValueError):
    """The zoo's artifacts are missing, changed or unreadable; the message names the file."""


@dataclass
class VerifyReport:
    folder: Path
    files: int
    bytes: int
    modules: int
    held_out: int


def read_manifest(folder: str | os.PathLike = ARTIFACTS) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ZooError(f"{path}: no zoo manifest (build one with `loraloom zoo build`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ZooError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise ZooError(f"{path}: expected a JSON object")
    for key, kind in (("files", dict), ("upstream", dict), ("held_out", list), ("settings", dict), ("demo", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ZooError(f"{path}: missing field {key!r} (or not a {kind.__name__})")
    demo = manifest["demo"]
    for key in ("tasks", "pool"):
        if not isinstance(demo.get(key), list) or not all(isinstance(n, str) for n in demo[key]):
            raise ZooError(f"{path}: field 'demo' needs {key!r}, a list of names")
    for name in demo["pool"]:
        if not isinstance(manifest["upstream"].get(name), dict) or not manifest["upstream"][name].get("module"):
            raise ZooError(f"{path}: the demo pool names {name!r}, which has no module in 'upstream'")
    return manifest


def verify(folder: str | os.PathLike = ARTIFACTS, *, load: bool = True) -> VerifyReport:
    """Check the zoo in ``folder`` (default: the one shipped in the package); see the module docstring."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    listed: dict[str, str] = manifest["files"]
    total = 0
    for rel, digest in sorted(listed.items()):
        path = folder / rel
        if not path.is_file():
            raise ZooError(f"{path}: listed in the manifest but missing")
        if sha256_of(path) != digest:
            raise ZooError(f"{path}: SHA-256 differs from the manifest's (the file was changed or damaged)")
        total += path.stat().st_size
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as f:
                for key in f.keys():
                    dtype = f.get_slice(key).get_dtype()
                    if dtype != "F16":
                        raise ZooError(f"{path}: tensor {key} is {dtype}, expected half precision (F16)")
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    extra = sorted(p for p in present - set(listed) if "__pycache__" not in p)
    if extra:
        raise ZooError(f"{folder / extra[0]}: not listed in the manifest ({len(extra)} such file(s))")

    settings = manifest["settings"]
    modules = {name: u["module"] for name, u in manifest["upstream"].items() if u.get("module")}
    for name in manifest["held_out"]:
        if name in manifest["upstream"]:
            raise ZooError(f"{folder / MANIFEST}: held-out task {name!r} is also an upstream task")
    for rel in modules.values():
        config, _, _ = read_adapter(folder / rel)
        if config.r != settings["module_rank"] or sorted(config.target_modules) != sorted(settings["module_targets"]):
            raise ZooError(
                f"{folder / rel}: rank {config.r} / targets {config.target_modules} differ from the manifest"
            )
    if load:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        try:
            model = AutoModelForSeq2SeqLM.from_pretrained(folder / "base")
            tokenizer = AutoTokenizer.from_pretrained(folder / "base")
        except Exception as e:  # a damaged folder: one message naming it
            raise ZooError(f"{folder / 'base'}: does not load as a transformers seq2seq model ({e})") from e
        if next(model.parameters()).dtype != torch.float32:
            raise ZooError(f"{folder / 'base'}: loads as {next(model.parameters()).dtype}, expected float32")
        if len(tokenizer) > model.config.vocab_size:
            raise ZooError(
                f"{folder / 'base'}: tokenizer has {len(tokenizer)} tokens, the model {model.config.vocab_size}"
            )
    return VerifyReport(folder, len(listed), total, len(modules), len(manifest["held_out"]))


__all__ = ["VerifyReport", "ZooError", "read_manifest", "verify"]
