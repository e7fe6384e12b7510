"""PES smoothness (S3): bond and torsion scans with roughness and spurious extrema; NVE energy drift; plots.

Units: positions Å, energies eV, bond coordinates Å, torsion coordinates in degrees for the user and in
radians inside `roughness`. Nothing here talks to MLflow; `polyfid evaluate` logs what this writes to a run.
"""

from __future__ import annotations

import dataclasses
import os
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import BaseCalculator

from polyfid.evaluation.plots import pyplot, save_figure

# Valence of a heavy atom whose bonds are all single; a bond with such an atom at one end is rotatable.
SATURATED_VALENCE = {5: 3, 6: 4, 7: 3, 8: 2, 9: 1, 14: 4, 15: 3, 16: 2, 17: 1}
EXTREMUM_TOL_EV = 1e-3  # a turning point must rise and fall by more than this to count (1 meV)
Reference = Union[BaseCalculator, Callable[[list[Atoms]], Sequence[float]], Sequence[float], np.ndarray]


# ---- connectivity --------------------------------------------------------------------------------
def bond_graph(atoms: Atoms, mult: float = 1.2) -> list[list[int]]:
    """Neighbours of each atom: pairs closer than `mult` times the sum of ASE's natural covalent radii."""
    from ase.neighborlist import natural_cutoffs, neighbor_list

    i, j = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=mult))
    adj: list[list[int]] = [[] for _ in range(len(atoms))]
    for a, b in zip(i.tolist(), j.tolist()):
        adj[a].append(b)
    return [sorted(n) for n in adj]


def side_of(adj: list[list[int]], fixed: int, moving: int) -> list[int] | None:
    """Atoms on `moving`'s side of the bond fixed–moving (moving included); None if the bond is in a ring."""
    seen, todo = {moving}, deque([moving])
    while todo:
        k = todo.popleft()
        for n in adj[k]:
            if k == moving and n == fixed:
                continue
            if n == fixed:
                return None  # reached `fixed` another way: a ring
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return sorted(seen)


def choose_bond(atoms: Atoms, adj: list[list[int]] | None = None) -> tuple[int, int]:
    """The first bond (lowest indices) between two heavy atoms, else the first bond to a hydrogen."""
    adj = adj if adj is not None else bond_graph(atoms)
    z = atoms.numbers
    pairs = [(i, j) for i in range(len(atoms)) for j in adj[i] if i < j]
    if not pairs:
        raise ValueError(f"{atoms.get_chemical_formula()} has no bonds to scan")
    heavy = [(i, j) for i, j in pairs if z[i] > 1 and z[j] > 1]
    return (heavy or pairs)[0]


def choose_torsion(atoms: Atoms, adj: list[list[int]] | None = None) -> tuple[int, int, int, int]:
    """The first proper torsion a-b-c-d about a single, acyclic heavy-heavy bond b-c.

    The bond counts as single when one end has its saturated valence (C 4, N 3, O 2, ...): so C-C in
    ethanol, C-O(H) in formic acid. a and d are the first neighbours of b and c, heavy atoms preferred.
    """
    adj = adj if adj is not None else bond_graph(atoms)
    z = atoms.numbers

    def saturated(k: int) -> bool:
        return SATURATED_VALENCE.get(int(z[k]), 0) == len(adj[k])

    def first_other(k: int, not_: int) -> int | None:
        others = [n for n in adj[k] if n != not_]
        return min(others, key=lambda n: (z[n] <= 1, n)) if others else None

    for b in range(len(atoms)):
        for c in adj[b]:
            if c <= b or z[b] <= 1 or z[c] <= 1 or not (saturated(b) or saturated(c)):
                continue
            a, d = first_other(b, c), first_other(c, b)
            if a is not None and d is not None and side_of(adj, b, c) is not None:
                return a, b, c, d
    raise ValueError(
        f"{atoms.get_chemical_formula()} has no torsion to scan: no acyclic single bond between two heavy "
        "atoms that both have another neighbour; give the four atoms with --scan-atoms a,b,c,d")


# ---- scans ---------------------------------------------------------------------------------------
def bond_scan(atoms: Atoms, i: int, j: int, distances: Sequence[float]) -> list[Atoms]:
    """Geometries with |r_i − r_j| set to each distance: atom i stays, j moves along the bond.

    j carries the fragment bonded to it (found from the connectivity, so a C–C stretch moves a whole
    methyl group rather than tearing its hydrogens off). For a bond inside a ring j moves alone.
    """
    side = side_of(bond_graph(atoms), i, j) or [j]
    out = []
    for r in distances:
        g = atoms.copy()
        g.calc = None
        g.set_distance(i, j, float(r), fix=0, indices=side)
        out.append(g)
    return out


def torsion_scan(atoms: Atoms, a: int, b: int, c: int, d: int, angles: Sequence[float]) -> list[Atoms]:
    """Geometries with the dihedral a-b-c-d set to each angle (degrees), rotating c's side of the b–c bond."""
    side = side_of(bond_graph(atoms), b, c)
    if side is None:
        raise ValueError(f"bond {b}-{c} is in a ring; a rigid torsion scan about it would break the ring")
    if a in side or d not in side:
        raise ValueError(f"{a}-{b}-{c}-{d} is not a torsion: {a} must be bonded on {b}'s side, {d} on {c}'s")
    out = []
    for phi in angles:
        g = atoms.copy()
        g.calc = None
        g.set_dihedral(a, b, c, d, float(phi), indices=side)
        out.append(g)
    return out


# ---- energies and metrics ------------------------------------------------------------------------
def as_calculator(model_or_calc: Any, fidelity: str | None = None) -> BaseCalculator:
    """An ASE calculator: passed through, or a polyfid Calculator (float64) on a Potential or package path."""
    if isinstance(model_or_calc, BaseCalculator):
        return model_or_calc
    import torch

    from polyfid.models.calculator import Calculator

    return Calculator(model_or_calc, fidelity=fidelity, dtype=torch.float64)


def energies(calc: BaseCalculator, geometries: Sequence[Atoms]) -> np.ndarray:
    """Potential energy (eV) of each geometry."""
    out = []
    for g in geometries:
        g = g.copy()
        g.calc = calc
        out.append(g.get_potential_energy())
    return np.asarray(out, dtype=np.float64)


def reference_energies(reference: Reference, geometries: Sequence[Atoms]) -> np.ndarray:
    """Reference energies (eV): from an ASE calculator, a callable on the geometries, or given as an array."""
    if isinstance(reference, BaseCalculator):
        ref = energies(reference, geometries)
    elif callable(reference):
        ref = np.asarray(reference(list(geometries)), dtype=np.float64)
    else:
        ref = np.asarray(reference, dtype=np.float64)
    if ref.shape != (len(geometries),):
        raise ValueError(f"{ref.shape[0] if ref.ndim else 0} reference energies for {len(geometries)} scan points")
    return ref


def roughness(energy: Sequence[float], x: Sequence[float]) -> float:
    """Mean squared second derivative by three-point differences: mean (E''_i)², in eV² per x-unit⁴.

    On a uniform grid E''_i = (E[i+1] − 2E[i] + E[i−1]) / h², so this is the mean squared second
    difference normalised by h⁴: it does not depend on the grid spacing (a quadratic a·x² gives 4a²
    exactly). Non-uniform grids use the non-uniform three-point formula. Bond scans: eV²/Å⁴; torsion
    scans pass radians, so eV²/rad⁴.
    """
    e, x = np.asarray(energy, np.float64), np.asarray(x, np.float64)
    if len(e) < 3 or e.shape != x.shape:
        raise ValueError("roughness needs at least 3 points and one x per energy")
    h0, h1 = np.diff(x)[:-1], np.diff(x)[1:]
    second = 2.0 * ((e[2:] - e[1:-1]) / h1 - (e[1:-1] - e[:-2]) / h0) / (h0 + h1)
    return float(np.mean(second**2))


def count_extrema(energy: Sequence[float], tol: float = EXTREMUM_TOL_EV) -> int:
    """Interior local extrema whose rise and fall both exceed `tol` (eV): turning points with hysteresis.

    The curve is walked keeping the running extreme; the direction flips, and one extremum is counted,
    only when the energy comes back by more than tol from it. Noise below tol is never counted; a real
    wiggle smaller than tol (1 meV by default) is not either.
    """
    e = np.asarray(energy, np.float64)
    count, direction, extreme = 0, 0, e[0]
    for v in e[1:]:
        if direction == 0:
            if abs(v - e[0]) > tol:  # the curve has left its start: rising (+1) or falling (-1)
                direction, extreme = (1 if v > e[0] else -1), v
        elif direction * (v - extreme) > 0:  # still going the same way
            extreme = v
        elif direction * (extreme - v) > tol:  # turned back by more than tol: `extreme` was an extremum
            count, direction, extreme = count + 1, -direction, v
    return count


def spurious_extrema(pred: Sequence[float], ref: Sequence[float], tol: float = EXTREMUM_TOL_EV) -> int:
    """Local extrema of the prediction minus those of the reference (negative: the model misses some)."""
    return count_extrema(pred, tol) - count_extrema(ref, tol)


@dataclasses.dataclass
class ScanResult:
    """One scan: its coordinate, the model's energies and, when given, the reference energies (eV)."""

    kind: str  # "bond" or "torsion"
    atoms: tuple[int, ...]
    x: np.ndarray  # Å for a bond, degrees for a torsion
    energy: np.ndarray
    fidelity: str = ""
    reference: np.ndarray | None = None
    reference_name: str = ""

    @property
    def x_unit(self) -> str:
        return "Å" if self.kind == "bond" else "deg"

    def metrics(self, tol: float = EXTREMUM_TOL_EV) -> dict[str, float]:
        """roughness (eV²/Å⁴ or eV²/rad⁴), span (eV), extrema; vs a reference: MAE after the mean offset."""
        x = self.x if self.kind == "bond" else np.radians(self.x)
        out = {"roughness": roughness(self.energy, x), "span_ev": float(np.ptp(self.energy)),
               "n_extrema": count_extrema(self.energy, tol)}
        if self.reference is not None:
            err = (self.energy - self.energy.mean()) - (self.reference - self.reference.mean())
            out.update(roughness_ref=roughness(self.reference, x), span_ref_ev=float(np.ptp(self.reference)),
                       n_extrema_ref=count_extrema(self.reference, tol),
                       spurious_extrema=spurious_extrema(self.energy, self.reference, tol),
                       mae_offset_ev=float(np.abs(err).mean()), max_err_offset_ev=float(np.abs(err).max()))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: metrics, atoms, the grid and the curves."""
        d = {"kind": self.kind, "atoms": list(self.atoms), "fidelity": self.fidelity, "x_unit": self.x_unit,
             "x": self.x.tolist(), "energy": self.energy.tolist(), **self.metrics()}
        if self.reference is not None:
            d.update(reference=self.reference.tolist(), reference_name=self.reference_name)
        return d


def default_grid(atoms: Atoms, kind: str, idx: Sequence[int], points: int) -> np.ndarray:
    """Bond: 0.8–1.5 × the current length; torsion: a full turn from the current angle (endpoints equal)."""
    if kind == "bond":
        r0 = atoms.get_distance(*idx)
        return np.linspace(0.8 * r0, 1.5 * r0, points)
    return atoms.get_dihedral(*idx) + np.linspace(0.0, 360.0, points)


def scan(model_or_calc: Any, atoms: Atoms, kind: str, indices: Sequence[int] | None = None,
         grid: Sequence[float] | None = None, points: int = 37, fidelity: str | None = None,
         reference: Reference | None = None, reference_name: str = "reference") -> ScanResult:
    """Scan a bond or torsion (indices chosen automatically when None) and evaluate model and reference."""
    if kind not in ("bond", "torsion"):
        raise ValueError(f"scan kind must be bond or torsion, got {kind!r}")
    want = 2 if kind == "bond" else 4
    if indices is None:
        adj = bond_graph(atoms)
        indices = choose_bond(atoms, adj) if kind == "bond" else choose_torsion(atoms, adj)
    indices = tuple(int(k) for k in indices)
    if len(indices) != want or max(indices) >= len(atoms) or min(indices) < 0:
        raise ValueError(f"a {kind} scan needs {want} atom indices in 0..{len(atoms) - 1}, got {indices}")
    x = np.asarray(grid if grid is not None else default_grid(atoms, kind, indices, points), np.float64)
    geoms = bond_scan(atoms, *indices, x) if kind == "bond" else torsion_scan(atoms, *indices, x)
    calc = as_calculator(model_or_calc, fidelity)
    ref = reference_energies(reference, geoms) if reference is not None else None
    return ScanResult(kind, indices, x, energies(calc, geoms), getattr(calc, "fidelity", fidelity) or "",
                      ref, reference_name if ref is not None else "")


# ---- NVE -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class NVEResult:
    """Energies along a velocity-Verlet run (eV), one row per step, step 0 included."""

    time_fs: np.ndarray
    potential: np.ndarray
    kinetic: np.ndarray
    n_atoms: int
    dt_fs: float
    temperature_K: float

    @property
    def total(self) -> np.ndarray:
        return self.potential + self.kinetic

    def metrics(self) -> dict[str, float]:
        """drift (meV/atom/ps, slope of a linear fit of E_total on time) and max |E_total − E_total(0)|."""
        tot = self.total
        if not np.isfinite(tot).all():
            return {"drift_mev_per_atom_per_ps": float("inf"), "max_abs_de_ev": float("inf"),
                    "max_abs_de_mev_per_atom": float("inf"), "steps": len(tot) - 1}
        slope = np.polyfit(self.time_fs / 1000.0, tot, 1)[0] if len(tot) > 1 else 0.0
        dmax = float(np.abs(tot - tot[0]).max())
        return {"drift_mev_per_atom_per_ps": float(slope) * 1000.0 / self.n_atoms, "max_abs_de_ev": dmax,
                "max_abs_de_mev_per_atom": dmax * 1000.0 / self.n_atoms, "mean_temperature_K":
                float(self.kinetic.mean() / (1.5 * self.n_atoms * units.kB)), "steps": len(tot) - 1}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: metrics, settings and the energy traces."""
        return {**self.metrics(), "dt_fs": self.dt_fs, "temperature_K": self.temperature_K, "n_atoms": self.n_atoms,
                "time_fs": self.time_fs.tolist(), "potential": self.potential.tolist(),
                "kinetic": self.kinetic.tolist()}


def nve_drift(model_or_calc: Any, atoms: Atoms, fidelity: str | None = None, steps: int = 200,
              dt_fs: float = 0.5, temperature_K: float = 300.0, seed: int = 0) -> NVEResult:
    """Velocity Verlet from a seeded Maxwell-Boltzmann start (no net momentum or rotation); records energies."""
    from ase.md import velocitydistribution as vd
    from ase.md.verlet import VelocityVerlet

    atoms = atoms.copy()
    atoms.calc = as_calculator(model_or_calc, fidelity)
    maxwell_boltzmann = getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution  # ase >= 3.26
    maxwell_boltzmann(atoms, temperature_K=temperature_K, rng=np.random.default_rng(seed))
    vd.Stationary(atoms)
    vd.ZeroRotation(atoms)
    dyn = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    rows: list[tuple[float, float, float]] = []

    def record() -> None:
        rows.append((dyn.get_time() / units.fs, atoms.get_potential_energy(), atoms.get_kinetic_energy()))

    dyn.attach(record, interval=1)
    dyn.run(steps)
    t, epot, ekin = (np.asarray(c, np.float64) for c in zip(*rows))
    return NVEResult(t, epot, ekin, len(atoms), dt_fs, temperature_K)


# ---- plots ---------------------------------------------------------------------------------------
def plot_scans(results: Sequence[ScanResult], out_png: str | os.PathLike) -> Path:
    """One panel per scan: model energy and reference (each relative to its minimum) against the coordinate."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(4.8 * len(results), 3.8), squeeze=False)
    for ax, r in zip(axes[0], results):
        ax.plot(r.x, r.energy - r.energy.min(), "o-", ms=3, label=f"model ({r.fidelity})")
        if r.reference is not None:
            ax.plot(r.x, r.reference - r.reference.min(), "k--", lw=1, label=r.reference_name)
        m = r.metrics()
        extra = f", spurious extrema {m['spurious_extrema']:+d}" if "spurious_extrema" in m else ""
        ax.set_title(f"{r.kind} {'-'.join(map(str, r.atoms))}: roughness {m['roughness']:.3g}{extra}", fontsize=9)
        ax.set_xlabel(f"{'distance' if r.kind == 'bond' else 'dihedral'} ({r.x_unit})")
        ax.set_ylabel("E − E_min (eV)")
        ax.legend(fontsize=8)
    return save_figure(fig, out_png)


def plot_nve(result: NVEResult, out_png: str | os.PathLike) -> Path:
    """Left: potential, kinetic and total energy against time; right: total-energy drift per atom with its fit."""
    plt = pyplot()
    t, tot = result.time_fs, result.total
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9.6, 3.8))
    for y, name in ((result.potential, "potential"), (result.kinetic, "kinetic"), (tot, "total")):
        ax.plot(t, y - tot[0], label=name)
    ax.set_xlabel("time (fs)")
    ax.set_ylabel("E − E_total(0) (eV)")
    ax.legend(fontsize=8)
    m = result.metrics()
    bx.plot(t, (tot - tot[0]) * 1000.0 / result.n_atoms)
    if np.isfinite(tot).all() and len(t) > 1:
        fit = np.polyval(np.polyfit(t, tot, 1), t)
        bx.plot(t, (fit - tot[0]) * 1000.0 / result.n_atoms, "k--", lw=1)
    bx.set_xlabel("time (fs)")
    bx.set_ylabel("E_total − E_total(0) (meV/atom)")
    bx.set_title(f"NVE dt={result.dt_fs} fs: drift {m['drift_mev_per_atom_per_ps']:.3g} meV/atom/ps", fontsize=9)
    return save_figure(fig, out_png)


def structure_from_store(store: Any, index: int) -> Atoms:
    """Structure `index` (in store order, 0-based) of an open Store, as ASE Atoms without labels."""
    start = 0
    for k, info in enumerate(store.shards):
        if index < start + info.n_structures:
            off = store.read_array(k, "offsets")
            a, b = int(off[index - start]), int(off[index - start + 1])
            z, pos = store.read_array(k, "atomic_numbers"), store.read_array(k, "positions")
            cell, pbc = store.read_array(k, "cell")[index - start], store.read_array(k, "pbc")[index - start]
            return Atoms(numbers=z[a:b], positions=np.asarray(pos[a:b], np.float64), cell=cell, pbc=pbc)
        start += info.n_structures
    raise IndexError(f"structure {index} is out of range: {store.path} holds {start} structures")
