"""Embedded two-fidelity demo dataset (see PROVENANCE.md; made by polyfid.datasets.demo_data)."""
from __future__ import annotations

from pathlib import Path

LOW = "gfn2_xtb"
HIGH = "b3lyp_631gs"
EXTRA = "wb97x_631gs"  # third level, formic_acid only (``--extra-level formic_acid``)

DEMO_DIR = Path(__file__).resolve().parent
_SCANS = "formic_acid_scans.extxyz.gz"


def demo_files() -> list[Path]:
    """Return the sorted list of per-molecule ``*.extxyz.gz`` demo files (scan files excluded)."""
    return sorted(p for p in DEMO_DIR.glob("*.extxyz.gz") if not p.name.endswith("_scans.extxyz.gz"))


def demo_scans() -> Path:
    """Return the formic acid O-H bond / H-O-C=O torsion reference scan file (gfn2_xtb and EXTRA)."""
    return DEMO_DIR / _SCANS
