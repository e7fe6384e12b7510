"""Sampling of corpus structures: RDKit start geometry, GFN2-xTB MD, normal modes, distortions, scans.

Every sampler returns (positions[S, N, 3], sampler names[S], temperatures[S], scan values[S]) for a
molecule's fixed atom order. Positions are rounded to :data:`POS_DECIMALS` later, by the store, so that the
content key and the labels refer to exactly the stored positions.
"""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes
from ase.constraints import FixCom
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta
from ase.optimize import BFGS

from polyfid.data_shards.corpus.levels import LabelError, Level, xtb
from polyfid.datasets.corpus.store import fractions
from polyfid.data_shards.corpus import DATA_DIR

MOLECULES_CSV = DATA_DIR / "molecules.csv"
TARGET_NAME, TARGET_SMILES = "paracetamol", "CC(=O)Nc1ccc(O)cc1"
MIN_PAIR_DISTANCE = 0.55  # Angstrom; distorted geometries closer than this are redrawn
_gfn2 = xtb("GFN2-xTB")


@dataclasses.dataclass(frozen=True)
class Molecule:
    """One molecule of the list: name, SMILES, functional group and role (train | heldout | target)."""

    name: str
    smiles: str
    group: str
    role: str


def wanted(level: Level, mol: Molecule, shash: str, label_all: bool) -> tuple[bool, bool]:
    """(energy, forces) that ``level`` wants for a structure of ``mol``."""
    if label_all or (mol.role == "target" and level.target):
        return True, True
    if mol.role == "target":
        return False, False
    return level.wants(fractions(shash)[0])


def load_molecules(path: Path = MOLECULES_CSV) -> list[Molecule]:
    """The committed molecule list, in file order."""
    with open(path, newline="") as fh:
        return [Molecule(r["name"], r["smiles"], r["group"], r["role"]) for r in csv.DictReader(fh)]


def target_molecule() -> Molecule:
    """The drug-like S3 target (not in the list)."""
    return Molecule(TARGET_NAME, TARGET_SMILES, "drug-like", "target")


class GFN2(Calculator):
    """ASE calculator on GFN2-xTB (tblite), used to drive MD and optimisations."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms: Atoms | None = None, properties: list[str] | None = None,
                  system_changes: list[str] = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        try:
            energy, forces = _gfn2(self.atoms.numbers, self.atoms.positions, True, False)
        except LabelError:
            energy, forces = _gfn2(self.atoms.numbers, self.atoms.positions, True, True)
        self.results = {"energy": energy, "forces": forces}


def rdkit_start(smiles: str, seed: int) -> tuple[Atoms, list[tuple[int, int]]]:
    """RDKit ETKDG embedding, then MMFF94 optimisation; returns the atoms and the bond list."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed)
    if AllChem.EmbedMolecule(mol, params) != 0:
        raise RuntimeError(f"ETKDG embedding failed for {smiles}")
    AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)
    atoms = Atoms([a.GetAtomicNum() for a in mol.GetAtoms()], positions=mol.GetConformer().GetPositions())
    bonds = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()]
    return atoms, bonds


def optimise(atoms: Atoms, fmax: float = 0.02, steps: int = 300) -> Atoms:
    """GFN2-xTB minimum near ``atoms`` (BFGS)."""
    opt = atoms.copy()
    opt.calc = GFN2()
    BFGS(opt, logfile=None).run(fmax=fmax, steps=steps)
    return Atoms(opt.numbers, positions=opt.positions.copy())


def md_frames(start: Atoms, temperature: float, n: int, rng: np.random.Generator, timestep_fs: float,
              equil_steps: int, stride: int, friction_per_fs: float) -> np.ndarray:
    """GFN2-xTB Langevin MD at ``temperature``: ``n`` frames, one every ``stride`` steps after equilibration."""
    atoms = Atoms(start.numbers, positions=start.positions.copy())
    atoms.calc = GFN2()
    thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    atoms.set_constraint(FixCom())
    dyn = Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature,
                   friction=friction_per_fs / units.fs, fixcm=False, rng=rng)
    dyn.run(equil_steps)
    out = np.empty((n, len(atoms), 3))
    for i in range(n):
        dyn.run(stride)
        out[i] = atoms.positions
    return out


def _hessian(atoms: Atoms, h: float = 0.005) -> np.ndarray:
    """GFN2-xTB Cartesian Hessian (eV/A^2) by central differences of the forces."""
    n = 3 * len(atoms)
    hess = np.empty((n, n))
    for k in range(n):
        grads = []
        for s in (1.0, -1.0):
            x = atoms.positions.copy()
            x.reshape(-1)[k] += s * h
            grads.append(-_gfn2(atoms.numbers, x, True, False)[1].reshape(-1))
        hess[k] = (grads[0] - grads[1]) / (2 * h)
    return 0.5 * (hess + hess.T)


def normal_mode_frames(start: Atoms, n: int, rng: np.random.Generator, t_range: tuple[float, float],
                       min_wavenumber: float = 300.0) -> np.ndarray:
    """Random displacements along GFN2-xTB normal modes, each mode Boltzmann-populated at a random T.

    For each frame T ~ U(t_range); mode amplitudes q_i ~ N(0, kT / k_i) in mass-weighted coordinates.
    Soft modes are floored at ``min_wavenumber`` so that rotors do not fly apart.
    """
    masses = start.get_masses()
    inv_sqrt_m = np.repeat(1.0 / np.sqrt(masses), 3)
    mw = _hessian(start) * np.outer(inv_sqrt_m, inv_sqrt_m)  # eV / (A^2 amu)
    evals, evecs = np.linalg.eigh(mw)
    n_rigid = 5 if _is_linear(start) else 6
    order = np.argsort(np.abs(evals))[n_rigid:]
    evals, evecs = np.abs(evals[order]), evecs[:, order]
    # floor: k = (2 pi c nu)^2 in eV/(A^2 amu); 1 cm^-1 -> omega in 1/s, then to ASE units
    omega_min = 2 * np.pi * 2.99792458e10 * min_wavenumber * 1e-15 / units.fs  # rad per ASE time unit
    evals = np.maximum(evals, omega_min ** 2)
    out = np.empty((n, len(start), 3))
    for i in range(n):
        kt = units.kB * rng.uniform(*t_range)
        q = rng.normal(0.0, np.sqrt(kt / evals))
        out[i] = start.positions + (evecs @ q * inv_sqrt_m).reshape(-1, 3)
    return out


def _is_linear(atoms: Atoms) -> bool:
    return bool(np.sort(atoms.get_moments_of_inertia())[0] < 1e-3)


def min_pair_distance(positions: np.ndarray) -> float:
    """Shortest interatomic distance (Angstrom) of one structure."""
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    return float(d[np.triu_indices(len(positions), 1)].min())


def distorted_frames(start: Atoms, bonds: list[tuple[int, int]], n_rattle: int, n_compress: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Repulsive geometries: strong random rattles, and compressions (whole molecule or one bond)."""
    frames, kinds = [], []
    while len(frames) < n_rattle + n_compress:
        x = start.positions.copy()
        if len(frames) < n_rattle:
            x += rng.normal(0.0, rng.uniform(0.08, 0.2), x.shape)
            kind = "rattle"
        elif len(frames) % 2 == 0 or not bonds:
            com = x.mean(0)
            x = com + (x - com) * rng.uniform(0.78, 0.95) + rng.normal(0.0, 0.03, x.shape)
            kind = "compress"
        else:
            i, j = bonds[rng.integers(len(bonds))]
            d = x[j] - x[i]
            x[j] = x[i] + d * rng.uniform(0.72, 0.9)
            x += rng.normal(0.0, 0.03, x.shape)
            kind = "compress_bond"
        if min_pair_distance(x) >= MIN_PAIR_DISTANCE:
            frames.append(x)
            kinds.append(kind)
    return np.array(frames).reshape(-1, len(start), 3), kinds


def _side(bonds: list[tuple[int, int]], n: int, root: int, blocked: int) -> list[int]:
    """Atoms reachable from ``root`` without crossing the bond to ``blocked``."""
    adj: dict[int, list[int]] = {i: [] for i in range(n)}
    for a, b in bonds:
        adj[a].append(b)
        adj[b].append(a)
    seen, todo = {root}, [root]
    while todo:
        for nb in adj[todo.pop()]:
            if nb != blocked and nb not in seen:
                seen.add(nb)
                todo.append(nb)
    return sorted(seen)


def target_scans(start: Atoms, bonds: list[tuple[int, int]], bond_values: np.ndarray,
                 torsion_values: np.ndarray) -> tuple[np.ndarray, list[str], list[float]]:
    """Paracetamol scans of the optimised geometry: phenol O-H stretch, and the amide C-N-C(ar)-C(ar) torsion.

    Atom order is RDKit's for :data:`TARGET_SMILES` (heavy atoms 0-10, then H): C0 C1(=O2) N3 C4(ar)
    C5(ar) ... O8 (phenol). Only the hydroxyl H moves in the bond scan; the whole acetamide side rotates
    about N3-C4 in the torsion scan.
    """
    z = start.numbers
    o_phenol = 8
    h_phenol = next(b if a == o_phenol else a for a, b in bonds
                    if o_phenol in (a, b) and z[b if a == o_phenol else a] == 1)
    frames, kinds, values = [], [], []
    for d in bond_values:
        a = start.copy()
        a.set_distance(o_phenol, h_phenol, float(d), fix=0)
        frames.append(a.positions.copy()), kinds.append("scan_bond"), values.append(float(d))
    amide_side = _side(bonds, len(start), 3, 4)  # N3 and everything bonded through it except the ring
    mask = [i in amide_side for i in range(len(start))]
    for ang in torsion_values:
        a = start.copy()
        a.set_dihedral(5, 4, 3, 1, float(ang), mask=mask)
        frames.append(a.positions.copy()), kinds.append("scan_torsion"), values.append(float(ang))
    return np.array(frames), kinds, values


def sample_structures(mol: Molecule, index: int, cfg) -> tuple[Atoms, np.ndarray, list[str], np.ndarray,
                                                                np.ndarray]:
    """All sampled structures of one molecule: (start, positions, samplers, temperatures, scan values).

    ``cfg`` is a :class:`~polyfid.datasets.corpus.config.CorpusConfig`. The target gets MD frames
    (``cfg.target_md_frames``) and the two scans; a list molecule gets MD, normal modes and distortions.
    """
    rdkit_atoms, bonds = rdkit_start(mol.smiles, cfg.seed + index)
    start = optimise(rdkit_atoms)
    frames, kinds, temps, scans = [], [], [], []
    md_counts = cfg.target_md_frames if mol.role == "target" else (cfg.md_frames,) * len(cfg.md_temperatures)
    for t_i, (temp, n) in enumerate(zip(cfg.md_temperatures, md_counts)):
        rng = np.random.default_rng([cfg.seed, index, 0, t_i])
        x = md_frames(start, temp, n, rng, cfg.timestep_fs, cfg.md_equil, cfg.md_stride, cfg.friction_per_fs)
        frames.append(x), kinds.extend([f"md{temp:g}K"] * n), temps.extend([temp] * n)
    if mol.role == "target":
        b0, b1, nb = cfg.scan_bond
        t0, t1, nt = cfg.scan_torsion
        x, k, v = target_scans(start, bonds, np.linspace(b0, b1, int(nb)), np.linspace(t0, t1, int(nt)))
        frames.append(x), kinds.extend(k), temps.extend([0.0] * len(k))
        scans = [np.nan] * (len(kinds) - len(k)) + v
    else:
        if cfg.nm_frames:
            rng = np.random.default_rng([cfg.seed, index, 1])
            frames.append(normal_mode_frames(start, cfg.nm_frames, rng, cfg.nm_temperatures))
            kinds.extend(["normal_mode"] * cfg.nm_frames), temps.extend([0.0] * cfg.nm_frames)
        if cfg.rattle_frames + cfg.compress_frames:
            rng = np.random.default_rng([cfg.seed, index, 2])
            x, k = distorted_frames(start, bonds, cfg.rattle_frames, cfg.compress_frames, rng)
            frames.append(x), kinds.extend(k), temps.extend([0.0] * len(k))
        scans = [np.nan] * len(kinds)
    return start, np.concatenate(frames), kinds, np.array(temps), np.array(scans)
