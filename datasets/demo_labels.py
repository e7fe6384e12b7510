"""The demo's levels of theory and their labels: GFN2-xTB (tblite) and DFT (PySCF), the starting geometries,
and the file and version helpers that demo_data.py (sampling, the two-level files) and demo_extra.py (the
third level) share."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process; parallelism via Pool
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import gzip
import io
import platform
from importlib.metadata import version
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms, units
from ase.build import molecule
from ase.calculators.calculator import Calculator, all_changes
from ase.optimize import BFGS

LOW, HIGH = "gfn2_xtb", "b3lyp_631gs"
SCF_CONV_TOL = 1e-9
EXTRA = "wb97x_631gs"  # third level, formic acid only (--extra-level)
EXTRA_XC, EXTRA_BASIS = "wb97x", "6-31g*"  # libxc HYB_GGA_XC_WB97X (Chai & Head-Gordon 2008)
MAX_EXTRA_WORKERS = 2
# formic acid atom order (ASE g2 HCOOH): O0 (hydroxyl), C1, O2 (carbonyl), H3 (hydroxyl), H4
SCAN_BOND = np.round(np.linspace(0.80, 1.60, 33), 6)  # O0-H3 distance (Angstrom), only H3 moves
SCAN_TORSION = np.round(np.linspace(0.0, 360.0, 37), 6)  # H3-O0-C1=O2 dihedral (degrees), only H3 moves
FD_EXTRA_MARKER = "## Extra level"  # start of the appended sections of FD_CHECK.md / PROVENANCE.md


def build_molecule(name: str) -> Atoms:
    """Return the starting geometry for ``name`` (ASE g2, or hand-built malonaldehyde)."""
    if name == "malonaldehyde":  # enol form, planar, intramolecular O-H...O bond
        return Atoms("CCCOOHHHH", positions=[
            (-1.20, 0.40, 0.0), (0.00, 1.10, 0.0), (1.20, 0.40, 0.0),
            (-1.25, -0.90, 0.0), (1.25, -0.90, 0.0), (-0.35, -1.30, 0.0),
            (-2.15, 0.95, 0.0), (0.00, 2.19, 0.0), (2.15, 0.95, 0.0)])
    g2 = {"ethanol": "CH3CH2OH", "methylamine": "H3CNH2", "formic_acid": "HCOOH"}
    return molecule(g2[name])


def gfn2_label(numbers: np.ndarray, positions: np.ndarray) -> tuple[float, np.ndarray]:
    """GFN2-xTB energy (eV) and forces (eV/A) from tblite for a neutral singlet."""
    from tblite.interface import Calculator as TBCalc

    calc = TBCalc("GFN2-xTB", np.asarray(numbers), np.asarray(positions) / units.Bohr)
    calc.set("verbosity", 0)
    res = calc.singlepoint()
    energy = float(res.get("energy")) * units.Hartree
    forces = -np.asarray(res.get("gradient")) * units.Hartree / units.Bohr
    return energy, forces


def dft_label(numbers: np.ndarray, positions: np.ndarray, xc: str = "b3lyp",
              basis: str = "6-31g*", conv_tol: float = SCF_CONV_TOL, grid_response: bool = False
              ) -> tuple[float, np.ndarray, bool]:
    """PySCF RKS energy (eV), forces (eV/A) and SCF convergence flag for a neutral singlet.

    The labels use ``grid_response=False`` (PySCF's default); ``True`` is only used by the
    finite-difference check to show where the analytic/FD difference comes from.
    """
    from pyscf import dft, gto, lib

    lib.num_threads(1)
    mol = gto.M(atom=[(int(z), tuple(p)) for z, p in zip(numbers, positions)],
                basis=basis, unit="Angstrom", charge=0, spin=0, verbose=0)
    mf = dft.RKS(mol)
    mf.xc = xc
    mf.conv_tol = conv_tol
    mf.max_cycle = 100
    e_tot = mf.kernel()
    if not mf.converged:
        return float("nan"), np.full((len(numbers), 3), np.nan), False
    gm = mf.nuc_grad_method()
    gm.grid_response = grid_response
    grad = gm.kernel()
    return float(e_tot) * units.Hartree, -np.asarray(grad) * units.Hartree / units.Bohr, True


def b3lyp_label(numbers: np.ndarray, positions: np.ndarray,
                conv_tol: float = SCF_CONV_TOL) -> tuple[float, np.ndarray, bool]:
    """B3LYP/6-31G* (PySCF RKS) energy (eV), forces (eV/A) and SCF convergence flag."""
    return dft_label(numbers, positions, "b3lyp", "6-31g*", conv_tol)


def wb97x_label(numbers: np.ndarray, positions: np.ndarray, conv_tol: float = SCF_CONV_TOL,
                grid_response: bool = False) -> tuple[float, np.ndarray, bool]:
    """wB97X/6-31G* (PySCF RKS) energy (eV), forces (eV/A) and SCF convergence flag."""
    return dft_label(numbers, positions, EXTRA_XC, EXTRA_BASIS, conv_tol, grid_response)


def _extra_task(args: tuple) -> tuple[float, np.ndarray, bool]:
    """Pool entry point for one extra-level label: (numbers, positions[, conv_tol, grid_response])."""
    return wb97x_label(*args)


def _high_task(args: tuple[np.ndarray, np.ndarray]) -> tuple[float, np.ndarray, bool]:
    """Pool entry point for one high-fidelity label."""
    return b3lyp_label(*args)


class GFN2Calculator(Calculator):
    """Minimal ASE calculator wrapping :func:`gfn2_label` (used to drive the MD)."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms: Atoms | None = None, properties: list[str] | None = None,
                  system_changes: list[str] = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        energy, forces = gfn2_label(self.atoms.numbers, self.atoms.positions)
        self.results = {"energy": energy, "forces": forces}


def optimised_start(name: str) -> Atoms:
    """Starting geometry pre-optimised with GFN2-xTB (BFGS, fmax 0.01 eV/A); calculator attached."""
    start = build_molecule(name)
    start.calc = GFN2Calculator()
    BFGS(start, logfile=None).run(fmax=0.01, steps=500)
    return start


def write_extxyz_gz(frames: list[Atoms], path: Path) -> None:
    """Write frames as extxyz, gzip-compressed with a fixed header (byte-reproducible)."""
    buf = io.StringIO()
    ase.io.write(buf, frames, format="extxyz")
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                 mtime=0, compresslevel=9) as gz:
        gz.write(buf.getvalue().encode())


def versions() -> dict[str, str]:
    """Versions of the codes that produced the labels."""
    from pyscf.dft import libxc

    out = {p: version(p) for p in ("pyscf", "tblite", "ase", "numpy")}
    out["libxc"] = str(libxc.__version__)
    out["python"] = platform.python_version()
    return out
