"""Checks on an adapter config's module patterns, run before any weight is read or allocated.

``check_json_type`` (base.py) checks each field's declared scalar type; this module checks what a type hint
cannot say: every regex compiles, lists hold strings (and not a million of them), layer indices are
integers, and per-module ``*_pattern`` values are finite and in range. Every error names the file and field.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import AdapterError

MAX_PATTERNS = 10_000  # more module names than any real model has; a 1M-entry list is an attack, not a config

# Fields holding module names or a regex (a string) over module paths.
PATTERN_FIELDS = ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern", "feedforward_modules")
# Per-module dicts: key = regex on the path's suffix; value checked by the given rule.
PER_MODULE_FIELDS = {"rank_pattern": "rank", "n_frequency_pattern": "rank", "alpha_pattern": "scalar"}


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_regex(pattern: str, field: str, source: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise AdapterError(f"{source}: field {field!r} holds an invalid regex {shown(pattern)} ({e})") from None


def check_names(value: Any, field: str, source: str) -> None:
    """None, a regex string, or a list of strings (module names)."""
    if value is None:
        return
    if isinstance(value, str):
        check_regex(value, field, source)
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AdapterError(f"{source}: field {field!r} must be a string or a list of strings, got {shown(value)}")
    if len(value) > MAX_PATTERNS:
        raise AdapterError(f"{source}: field {field!r} lists {len(value)} names (at most {MAX_PATTERNS})")


def check_layer_indices(value: Any, source: str) -> None:
    if value is None:
        return
    items = value if isinstance(value, list) else [value]
    if len(items) > MAX_PATTERNS or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise AdapterError(
            f"{source}: field 'layers_to_transform' must be a layer index or a list of them (integers >= 0), "
            f"got {shown(value)}"
        )


def check_per_module(value: Any, field: str, rule: str, source: str) -> None:
    if not isinstance(value, dict):
        raise AdapterError(f"{source}: field {field!r} must map module patterns to numbers, got {shown(value)}")
    if len(value) > MAX_PATTERNS:
        raise AdapterError(f"{source}: field {field!r} has {len(value)} entries (at most {MAX_PATTERNS})")
    for key, v in value.items():
        if not isinstance(key, str):
            raise AdapterError(f"{source}: field {field!r} has a non-string key {shown(key)}")
        check_regex(key, f"{field}[{key!r}]", source)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise AdapterError(f"{source}: field {field}[{key!r}] must be a finite number, got {shown(v)}")
        if rule == "rank" and (not float(v).is_integer() or v < 1):
            raise AdapterError(f"{source}: field {field}[{key!r}] must be a positive integer, got {shown(v)}")


def check_fields(values: dict[str, Any], source: str) -> None:
    """Raise one AdapterError naming ``source`` and the field for the first bad module pattern or value in
    ``values`` (a config's JSON fields), before the config object is built."""
    for field in PATTERN_FIELDS:
        if field in values:
            check_names(values[field], field, source)
    if "layers_to_transform" in values:
        check_layer_indices(values["layers_to_transform"], source)
    for field, rule in PER_MODULE_FIELDS.items():
        if field in values:
            check_per_module(values[field], field, rule, source)
