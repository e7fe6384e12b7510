"""Checks of the corpus levels: cost per structure, and forces against finite differences of the energy.

    python -m polyfid.datasets.corpus.checks cost [--molecule indole --structures 3]   -> COSTS.md
    python -m polyfid.datasets.corpus.checks fd [--molecule methanol]                  -> FD_CHECK.md

Both run one process, one thread (run them under ``nice`` beside the generator).
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import time
from pathlib import Path

import numpy as np

from polyfid._util import split_list
from polyfid.datasets.corpus.config import CorpusConfig
from polyfid.data_shards.corpus.levels import LEVELS, Level
from polyfid.datasets.corpus.sample import load_molecules, optimise, rdkit_start
from polyfid.data_shards.corpus import DATA_DIR

ROOT = DATA_DIR
FD_COMPONENTS = ((0, 0), (1, 1), (-1, 2))  # (atom, xyz): first heavy atom, second atom, last H


def test_structures(name: str, n: int, seed: int, sigma: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rattled copies (sigma in A) of the GFN2-xTB minimum of list molecule ``name``."""
    mol = next(m for m in load_molecules() if m.name == name)
    start = optimise(rdkit_start(mol.smiles, seed)[0])
    rng = np.random.default_rng(seed)
    return start.numbers, start.positions + rng.normal(0.0, sigma, (n,) + start.positions.shape)


def measure_costs(name: str, n: int, seed: int, levels: tuple[Level, ...] = LEVELS) -> list[str]:
    """CPU seconds per structure of each level (energy only, and energy + forces) on ``n`` structures."""
    numbers, xs = test_structures(name, n, seed)
    lines = [f"# Cost per structure ({name}, {len(numbers)} atoms, {n} rattled structures)", "",
             "CPU seconds (process time, one thread) per structure, mean over the structures. "
             f"Command: `python -m polyfid.datasets.corpus.checks cost --molecule {name} --structures {n}`.", "",
             "| level | E only (CPU s) | E + F (CPU s) |", "|---|---|---|"]
    for level in levels:
        cost = []
        for forces in (False, True):
            t0 = time.process_time()
            for x in xs:
                level.fn(numbers, x, forces, False)
            cost.append((time.process_time() - t0) / n)
        lines.append(f"| `{level.name}` | {cost[0]:.3g} | {cost[1]:.3g} |")
        print(lines[-1], flush=True)
    return lines


def fd_check(name: str, seed: int, h: float = 1e-3, levels: tuple[Level, ...] = LEVELS) -> list[str]:
    """Analytic forces against central differences -(E(x+h) - E(x-h)) / 2h on two rattled structures."""
    numbers, xs = test_structures(name, 2, seed)
    lines = [f"# Finite-difference force check ({name}, GFN2-xTB minimum rattled by 0.05 A, 2 structures)", "",
             f"Central differences, h = {h} A. Command: `python -m polyfid.datasets.corpus.checks fd "
             f"--molecule {name}`. The DFT forces omit the grid response, as the labels do.", "",
             "| level | structure | atom | xyz | F analytic (eV/A) | F fd (eV/A) | abs diff |",
             "|---|---|---|---|---|---|---|"]
    for level in levels:
        for s, x in enumerate(xs):
            forces = level.fn(numbers, x, True, False)[1]
            for a, c in FD_COMPONENTS:
                e = []
                for sign in (1.0, -1.0):
                    y = x.copy()
                    y[a, c] += sign * h
                    e.append(level.fn(numbers, y, False, False)[0])
                f_fd = -(e[0] - e[1]) / (2 * h)
                a_idx = a % len(numbers)
                lines.append(f"| `{level.name}` | {s} | {a_idx} (Z={numbers[a_idx]}) | {'xyz'[c]} | "
                             f"{forces[a, c]:.6f} | {f_fd:.6f} | {abs(forces[a, c] - f_fd):.2e} |")
                print(lines[-1], flush=True)
    return lines


def main() -> None:
    """Command line: ``cost`` or ``fd``; writes the markdown next to PROVENANCE.md."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("check", choices=("cost", "fd"))
    ap.add_argument("--molecule", default=None, help="a molecule of the list (default indole / methanol)")
    ap.add_argument("--structures", type=int, default=3, help="structures per level (cost)")
    ap.add_argument("--levels", default="", help="comma-separated level names (default all)")
    ap.add_argument("--root", type=Path, default=ROOT)
    args = ap.parse_args()
    levels = tuple(lv for lv in LEVELS if not args.levels or lv.name in split_list(args.levels))
    seed = CorpusConfig().seed
    if args.check == "cost":
        lines = measure_costs(args.molecule or "indole", args.structures, seed, levels)
        (args.root / "COSTS.md").write_text("\n".join(lines) + "\n")
    else:
        lines = fd_check(args.molecule or "methanol", seed, levels=levels)
        (args.root / "FD_CHECK.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
