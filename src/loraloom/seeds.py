"""Seed lists as people type them: ``"1-5"``, ``"1,3,7-8"``."""

from __future__ import annotations

MAX_SEEDS = 10_000  # a typo such as 1-1000000 is an error, not a week of runs


def parse_seeds(text: str) -> list[int]:
    """``"1-5"`` -> [1, 2, 3, 4, 5]; ``"1,3,7-8"`` -> [1, 3, 7, 8]. Seeds are non-negative integers."""
    seeds: list[int] = []
    for part in str(text).split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()) or (dash and int(last) < int(first)):
            raise ValueError(f"--seeds {text!r}: expected non-negative numbers and ranges such as 1-5 or 1,3,7-8")
        if (int(last) - int(first) if dash else 0) + len(seeds) >= MAX_SEEDS:
            raise ValueError(f"--seeds {text!r}: more than {MAX_SEEDS} seeds")
        seeds += list(range(int(first), int(last) + 1)) if dash else [int(first)]
    return seeds


__all__ = ["MAX_SEEDS", "parse_seeds"]
