"""The adapters floor's error: bad adapter input, named by file, layer or field."""

from __future__ import annotations


class AdapterError(ValueError):
    """Bad adapter input: a config field, a file, a layer or a shape that does not fit."""


__all__ = ["AdapterError"]
