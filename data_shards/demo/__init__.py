"""Embedded two-fidelity demo dataset (see PROVENANCE.md and make_demo_data.py)."""
from __future__ import annotations

from pathlib import Path

LOW = "gfn2_xtb"
HIGH = "b3lyp_631gs"

_HERE = Path(__file__).resolve().parent


def demo_files() -> list[Path]:
    """Return the sorted list of per-molecule ``*.extxyz.gz`` demo files."""
    return sorted(_HERE.glob("*.extxyz.gz"))
