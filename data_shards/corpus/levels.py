"""The levels of theory of the pretraining corpus: one table, one entry per level (= one fidelity).

A level function takes atomic numbers, positions (Angstrom), whether forces are wanted and whether to
use the safer retry settings, and returns (total energy in eV, forces in eV/Angstrom or None).
It raises :class:`LabelError` when the calculation fails or does not converge; the generator then
retries once with ``safe=True`` and otherwise drops and counts the structure. Adding a level is one
:class:`Level` entry in :data:`LEVELS`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np

HARTREE_EV = 27.211386024367243  # ase.units.Hartree (CODATA 2014, as the demo data)
BOHR_A = 0.5291772105638411  # ase.units.Bohr
SCF_CONV_TOL = 1e-9  # Hartree; PySCF levels
SCF_MAX_CYCLE = 100
MAX_FORCE = 1e3  # eV/A; a larger force is treated as a failed calculation

LabelFn = Callable[[np.ndarray, np.ndarray, bool, bool], tuple[float, Optional[np.ndarray]]]


class LabelError(RuntimeError):
    """A calculation failed or did not converge; it must never become a label."""


@dataclasses.dataclass(frozen=True)
class Level:
    """One level of theory: the fidelity's metadata, its label function and which structures it labels."""

    name: str  # fidelity name; info key energy_<name>, array forces_<name>
    method: str
    basis: str
    code: str
    dispersion: str
    rank: int  # higher = more accurate (the store's fidelity rank)
    fn: LabelFn
    subset: tuple[float, float]  # energies on structures whose hash fraction u lies in [lo, hi)
    forces_subset: tuple[float, float]  # forces on those with u in [lo, hi) (inside `subset`)
    chunk: int  # structures per Ray task
    target: bool  # also labels every structure of the S3 target (energies and forces)
    settings: str  # human-readable settings for PROVENANCE.md

    def wants(self, u: float) -> tuple[bool, bool]:
        """(energy, forces) wanted for a main-corpus structure with hash fraction ``u``."""
        e = self.subset[0] <= u < self.subset[1]
        f = self.forces_subset[0] <= u < self.forces_subset[1]
        return e or f, f

    def meta(self) -> dict[str, object]:
        """Fidelity metadata for the polyfid store."""
        return {"rank": self.rank, "method": self.method, "basis": self.basis, "code": self.code,
                "dispersion": self.dispersion}


def _checked(energy: float, forces: Optional[np.ndarray], what: str) -> tuple[float, Optional[np.ndarray]]:
    if not np.isfinite(energy):
        raise LabelError(f"{what}: non-finite energy")
    if forces is not None and (not np.all(np.isfinite(forces)) or np.abs(forces).max() > MAX_FORCE):
        raise LabelError(f"{what}: non-finite or absurd forces")
    return energy, forces


def xtb(method: str) -> LabelFn:
    """A tblite level (``GFN2-xTB`` or ``GFN1-xTB``), neutral singlet, default accuracy."""

    def label(numbers: np.ndarray, positions: np.ndarray, forces: bool, safe: bool
              ) -> tuple[float, Optional[np.ndarray]]:
        from tblite.interface import Calculator

        try:
            calc = Calculator(method, np.asarray(numbers), np.asarray(positions) / BOHR_A)
            calc.set("verbosity", 0)
            if safe:  # more cycles and stronger damping of the SCC mixer
                calc.set("max-iter", 1000)
                calc.set("mixer-damping", 0.1)
            res = calc.singlepoint()
            energy = float(res.get("energy")) * HARTREE_EV
            grad = np.asarray(res.get("gradient"))
        except Exception as err:  # tblite raises on SCC non-convergence
            raise LabelError(f"{method}: {err}") from err
        f = -grad * (HARTREE_EV / BOHR_A) if forces else None
        return _checked(energy, f, method)

    return label


def pyscf_scf(xc: str, basis: str, grid_level: int = 3) -> LabelFn:
    """A PySCF restricted SCF level with density fitting: ``xc='hf'`` is RHF, anything else RKS."""

    def label(numbers: np.ndarray, positions: np.ndarray, forces: bool, safe: bool
              ) -> tuple[float, Optional[np.ndarray]]:
        from pyscf import dft, gto, lib, scf

        lib.num_threads(1)
        mol = gto.M(atom=[(int(z), tuple(map(float, p))) for z, p in zip(numbers, positions)],
                    basis=basis, unit="Angstrom", charge=0, spin=0, verbose=0, max_memory=2000)
        if xc == "hf":
            mf = scf.RHF(mol).density_fit()
        else:
            mf = dft.RKS(mol).density_fit()
            mf.xc = xc
            mf.grids.level = grid_level
        mf.conv_tol = SCF_CONV_TOL
        mf.max_cycle = SCF_MAX_CYCLE
        if safe:  # level shift and damping, more cycles, a larger DIIS space
            mf.level_shift, mf.damp, mf.diis_space, mf.max_cycle = 0.5, 0.5, 12, 300
        try:
            energy = float(mf.kernel())
        except Exception as err:
            raise LabelError(f"{xc}/{basis}: {err}") from err
        if not mf.converged:
            raise LabelError(f"{xc}/{basis}: SCF not converged in {mf.max_cycle} cycles")
        f = -np.asarray(mf.nuc_grad_method().kernel()) * (HARTREE_EV / BOHR_A) if forces else None
        return _checked(energy * HARTREE_EV, f, f"{xc}/{basis}")

    return label


# Fractions u come from each structure's content hash (uniform on [0, 1)), so a level's subset is a
# random, reproducible sample of every molecule's structures. GFN1 labels the structures GFN2 does not:
# a second dataset at its own level. HF labels a subset of GFN2's structures; wB97X energies the lowest
# quarter of HF's, and wB97X forces the lowest 3/8 of those. With ~600 structures per molecule over the list
# this gives about 43k GFN2, 17k GFN1, 4k HF, 1k wB97X energies and 375 wB97X forces. wB97X was planned at
# 4k energies and 1.5k forces; it costs 36-60 CPU s per structure on indole and ~100 on paracetamol (COSTS.md,
# PROVENANCE.md), so it was cut by 4x, keeping the ratios (many cheap labels, fewer expensive energies, fewest
# forces).
LEVELS: tuple[Level, ...] = (
    Level("gfn2_xtb", "GFN2-xTB", "", "tblite", "D4 (built in)", 1, xtb("GFN2-xTB"),
          (0.0, 0.72), (0.0, 0.72), 300, True,
          "tblite python API, neutral singlet, default accuracy 1.0, electronic temperature 300 K; "
          "retry: max-iter 1000, mixer damping 0.1"),
    Level("gfn1_xtb", "GFN1-xTB", "", "tblite", "D3(BJ) (built in)", 0, xtb("GFN1-xTB"),
          (0.72, 1.0), (0.72, 1.0), 300, False,
          "tblite python API, neutral singlet, default accuracy 1.0, electronic temperature 300 K; "
          "retry: max-iter 1000, mixer damping 0.1"),
    Level("hf_631g", "HF", "6-31G", "pyscf", "none", 2, pyscf_scf("hf", "6-31g"),
          (0.0, 0.068), (0.0, 0.068), 1, False,
          "PySCF RHF with density fitting (`.density_fit()`, default auxiliary basis), conv_tol 1e-9, "
          "max_cycle 100, analytic DF gradients; retry: level shift 0.5, damping 0.5, DIIS space 12, "
          "300 cycles"),
    Level("wb97x_631gs", "wB97X", "6-31G*", "pyscf", "none", 3, pyscf_scf("wb97x", "6-31g*"),
          (0.0, 0.017), (0.0, 0.006375), 1, True,
          "PySCF RKS, xc `wb97x` (libxc HYB_GGA_XC_WB97X), density fitting (`.density_fit()`), "
          "spherical 5d, grids level 3, conv_tol 1e-9, max_cycle 100, analytic DF gradients without "
          "grid response; retry: level shift 0.5, damping 0.5, DIIS space 12, 300 cycles"),
)


def level_by_name(name: str, levels: tuple[Level, ...] = LEVELS) -> Level:
    """The table entry called ``name``; the error lists the allowed names."""
    for level in levels:
        if level.name == name:
            return level
    raise KeyError(f"unknown level {name!r}; allowed: {[lv.name for lv in levels]}")
