"""Small helpers that every layer may import (a leaf: it imports nothing from polyfid)."""

from __future__ import annotations


def split_list(text: str) -> list[str]:
    """The items of a comma-separated list, empty ones dropped ("a,,b," -> ["a", "b"]); no stripping."""
    return [s for s in text.split(",") if s]
