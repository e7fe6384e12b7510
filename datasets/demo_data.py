"""Generate the embedded polyfid demo dataset with real two-fidelity QM labels.

For four small H/C/N/O molecules, GFN2-xTB Langevin molecular dynamics (tblite)
is run at several temperatures; decorrelated frames are labelled with

* low fidelity  ``gfn2_xtb``:    GFN2-xTB (tblite), energies and forces;
* high fidelity ``b3lyp_631gs``: B3LYP/6-31G* (PySCF RKS), energies and forces.

``--extra-level formic_acid`` adds a third level to an existing formic acid file,

* ``wb97x_631gs``: wB97X/6-31G* (PySCF RKS, the ANI-1x functional/basis), energies and forces,

keeping every existing column and the frame order (checked bit-for-bit after writing), and
writes ``<out>/formic_acid_scans.extxyz.gz``: an O-H bond scan and an H-O-C=O torsion scan of
the GFN2-xTB-optimised geometry at ``gfn2_xtb`` and ``wb97x_631gs``.

Energies are total energies in eV, forces in eV/Angstrom (forces = -gradient).
Each molecule is written to ``<out>/<name>.extxyz.gz`` and a ``PROVENANCE.md``
is written next to them. ``--check`` instead validates the force sign and units
by central finite differences of the energy at both levels (``FD_CHECK.md``).

Usage::

    python datasets/demo_data.py --out data_shards/demo [--frames 100]
    python datasets/demo_data.py --out data_shards/demo --check
    python datasets/demo_data.py --out data_shards/demo --extra-level formic_acid
    python datasets/demo_data.py --out data_shards/demo --extra-level formic_acid --check
"""
from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # one thread per process; parallelism via Pool
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import shlex
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms, units
from ase.md.langevin import Langevin
from ase.constraints import FixCom
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta
from tqdm import tqdm

from polyfid.data_shards.demo import DEMO_DIR
from polyfid.datasets.demo_labels import (EXTRA, FD_EXTRA_MARKER, HIGH, LOW, MAX_EXTRA_WORKERS, SCF_CONV_TOL,
                                          GFN2Calculator, _high_task, b3lyp_label, build_molecule, gfn2_label,
                                          optimised_start, versions, write_extxyz_gz)

TEMPERATURES_K: tuple[float, ...] = (300.0, 600.0, 900.0)
TIMESTEP_FS = 0.5
EQUIL_STEPS = 200  # 100 fs equilibration per trajectory (discarded)
STRIDE = 20  # one frame every 10 fs
FRICTION_PER_FS = 0.01
MOLECULES: tuple[str, ...] = ("ethanol", "malonaldehyde", "methylamine", "formic_acid")
EXTRA_MOLECULES: tuple[str, ...] = ("formic_acid",)


def frames_per_temperature(n_frames: int) -> list[int]:
    """Split ``n_frames`` as evenly as possible over :data:`TEMPERATURES_K`."""
    k = len(TEMPERATURES_K)
    return [n_frames // k + (1 if i < n_frames % k else 0) for i in range(k)]


def sample_molecule(name: str, mol_index: int, n_frames: int, seed: int) -> list[Atoms]:
    """Pre-optimise with GFN2-xTB, then run one Langevin trajectory per temperature."""
    start = optimised_start(name)
    frames: list[Atoms] = []
    for t_index, (temp, n_t) in enumerate(zip(TEMPERATURES_K, frames_per_temperature(n_frames))):
        rng = np.random.default_rng([seed, mol_index, t_index])
        atoms = Atoms(start.numbers, positions=start.positions.copy())
        atoms.calc = GFN2Calculator()
        thermalize_momenta(atoms, temperature_K=temp, rng=rng)  # Maxwell-Boltzmann
        Stationary(atoms)
        ZeroRotation(atoms)
        atoms.set_constraint(FixCom())
        dyn = Langevin(atoms, TIMESTEP_FS * units.fs, temperature_K=temp,
                       friction=FRICTION_PER_FS / units.fs, fixcm=False, rng=rng)
        dyn.run(EQUIL_STEPS)
        for _ in range(n_t):
            dyn.run(STRIDE)
            frame = Atoms(atoms.numbers, positions=atoms.positions.copy())
            frame.info.update(molecule=name, temperature_K=temp,
                              md_step=int(dyn.nsteps), frame_id=len(frames))
            frames.append(frame)
    return frames


def fd_check(out: Path, seed: int, h: float = 1e-3) -> None:
    """Compare analytic forces with central finite differences of E at both levels."""
    atoms = build_molecule("ethanol")
    atoms.positions += np.random.default_rng(seed).normal(0.0, 0.05, atoms.positions.shape)
    comps = [(0, 0), (2, 1), (8, 2)]  # (atom, xyz): a C, the O, an H
    fns = {LOW: lambda x: gfn2_label(atoms.numbers, x),
           HIGH: lambda x: b3lyp_label(atoms.numbers, x, conv_tol=1e-11)[:2]}
    lines = ["# Finite-difference force check (ethanol, rattled 0.05 A)", "",
             f"Central differences, h = {h} A, F_fd = -(E(x+h) - E(x-h)) / 2h.", "",
             "| level | atom | xyz | F_analytic (eV/A) | F_fd (eV/A) | abs diff |",
             "|---|---|---|---|---|---|"]
    for level, fn in fns.items():
        forces = fn(atoms.positions)[1]
        for a, c in tqdm(comps, desc=f"fd {level}"):
            e = []
            for s in (+1, -1):
                x = atoms.positions.copy()
                x[a, c] += s * h
                e.append(fn(x)[0])
            f_fd = -(e[0] - e[1]) / (2 * h)
            lines.append(f"| {level} | {a} ({atoms[a].symbol}) | {'xyz'[c]} | "
                         f"{forces[a, c]:.6f} | {f_fd:.6f} | {abs(forces[a, c] - f_fd):.2e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    path = out / "FD_CHECK.md"
    old = path.read_text() if path.exists() else ""
    if FD_EXTRA_MARKER in old:  # keep the appended extra-level section(s)
        text += "\n" + old[old.index(FD_EXTRA_MARKER):]
    path.write_text(text)


def stats_table(results: dict[str, list[Atoms]]) -> list[str]:
    """Markdown summary: frames, energy ranges, mean |F_high - F_low| per molecule."""
    rows = ["| molecule | frames | E range gfn2_xtb (eV) | E range b3lyp_631gs (eV) | "
            "mean abs(F_high - F_low) (eV/A) |", "|---|---|---|---|---|"]
    for name, frames in results.items():
        el = np.array([f.info[f"energy_{LOW}"] for f in frames])
        eh = np.array([f.info[f"energy_{HIGH}"] for f in frames])
        df = np.concatenate([np.abs(f.arrays[f"forces_{HIGH}"] - f.arrays[f"forces_{LOW}"]).ravel()
                             for f in frames])
        rows.append(f"| {name} | {len(frames)} | {el.min():.3f} .. {el.max():.3f} "
                    f"(span {np.ptp(el):.3f}) | {eh.min():.3f} .. {eh.max():.3f} "
                    f"(span {np.ptp(eh):.3f}) | {df.mean():.4f} |")
    return rows


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEMO_DIR)
    ap.add_argument("--frames", type=int, default=100, help="frames per molecule")
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--workers", type=int, default=2, help="processes for B3LYP labels")
    ap.add_argument("--check", action="store_true", help="only run the finite-difference check")
    ap.add_argument("--extra-level", choices=EXTRA_MOLECULES, default=None,
                    help=f"add the {EXTRA} level (wB97X/6-31G*) to this existing molecule file and "
                         f"write its bond/torsion scans (at most {MAX_EXTRA_WORKERS} processes); "
                         "with --check: finite-difference check of that level on 2 frames")
    return ap.parse_args()


def _sample_and_label(args: argparse.Namespace) -> tuple[dict[str, list[Atoms]], dict[str, int], list[str], float]:
    """GFN2-xTB MD frames of every molecule, labelled at both levels and written; returns (frames by molecule,
    file sizes, SCF failures dropped, MD seconds)."""
    t0 = time.time()
    sampled = {n: sample_molecule(n, i, args.frames, args.seed) for i, n in
               enumerate(tqdm(MOLECULES, desc="GFN2-xTB MD"))}
    t_md = time.time() - t0
    flat = [f for n in MOLECULES for f in sampled[n]]
    for f in flat:
        e, frc = gfn2_label(f.numbers, f.positions)
        f.info[f"energy_{LOW}"] = e
        f.arrays[f"forces_{LOW}"] = frc
    # interleave molecules so the pool stays balanced and the ETA is representative
    order = sorted(range(len(flat)), key=lambda i: (flat[i].info["frame_id"],
                                                    MOLECULES.index(flat[i].info["molecule"])))
    high: list[tuple[float, np.ndarray, bool]] = [(0.0, np.zeros(0), False)] * len(flat)
    with Pool(args.workers) as pool:
        tasks = [(flat[i].numbers, flat[i].positions) for i in order]
        for i, res in zip(order, tqdm(pool.imap(_high_task, tasks, chunksize=1),
                                      total=len(flat), desc="B3LYP/6-31G*")):
            high[i] = res
    dropped: list[str] = []
    for f, (e, frc, ok) in zip(flat, high):
        f.info[f"energy_{HIGH}"] = e
        f.arrays[f"forces_{HIGH}"] = frc
        if not ok:
            dropped.append(f"{f.info['molecule']} frame_id={f.info['frame_id']}")
    results: dict[str, list[Atoms]] = {}
    sizes: dict[str, int] = {}
    for name in MOLECULES:
        keep = [f for f in sampled[name] if np.isfinite(f.info[f"energy_{HIGH}"])]
        path = args.out / f"{name}.extxyz.gz"
        write_extxyz_gz(keep, path)
        assert len(ase.io.read(path, ":")) == len(keep)
        results[name], sizes[name] = keep, path.stat().st_size
    return results, sizes, dropped, t_md


def _provenance(args: argparse.Namespace, results: dict[str, list[Atoms]], sizes: dict[str, int], dropped: list[str],
                wall: float, t_md: float) -> list[str]:
    """PROVENANCE.md of the demo data."""
    v = versions()
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    md = [
        "# Demo dataset provenance", "",
        "Generated by `datasets/demo_data.py`. Exact command:", "",
        f"    {cmd}", "",
        "## Levels of theory", "",
        f"- `{LOW}` (low fidelity): GFN2-xTB, tblite {v['tblite']} python API, neutral "
        "singlet, default accuracy and electronic temperature (300 K).",
        f"- `{HIGH}` (high fidelity): B3LYP/6-31G*, PySCF {v['pyscf']} (libxc {v['libxc']}), "
        "restricted Kohn-Sham, PySCF `b3lyp` = libxc HYB_GGA_XC_B3LYP (VWN-RPA, "
        f"Gaussian convention), default grids (level 3), conv_tol {SCF_CONV_TOL:g}, max_cycle 100, "
        "analytic gradients via `nuc_grad_method()` (no grid response), no symmetry.",
        f"- ASE {v['ase']}, numpy {v['numpy']}, Python {v['python']}.", "",
        "## Units and keys", "",
        f"- `info['energy_{LOW}']`, `info['energy_{HIGH}']`: total energies in eV "
        "(Hartree converted with `ase.units.Hartree`), not referenced to atoms.",
        f"- `arrays['forces_{LOW}']`, `arrays['forces_{HIGH}']`: forces in eV/Angstrom, "
        "forces = -gradient * Hartree/Bohr. Sign/units checked by finite differences "
        "(`--check`, see `FD_CHECK.md`).",
        "- `info`: `molecule`, `temperature_K`, `md_step` (Langevin steps since the trajectory "
        "start, equilibration included), `frame_id` (index in sampling order; gaps = dropped).",
        "- No ASE calculator is attached; positions in Angstrom, no cell / pbc.", "",
        "## Sampling", "",
        "- Start: ASE g2 geometry (ethanol CH3CH2OH, methylamine H3CNH2, formic acid HCOOH) or a "
        "hand-built enol malonaldehyde; all pre-optimised with GFN2-xTB (BFGS, fmax 0.01 eV/A).",
        f"- GFN2-xTB Langevin MD (ASE), timestep {TIMESTEP_FS} fs, friction "
        f"{FRICTION_PER_FS}/fs, `fixcm=False` + `FixCom`, Maxwell-Boltzmann init "
        "(`thermalize_momenta`, then zero momentum / angular momentum), "
        f"temperatures {', '.join(f'{t:g}' for t in TEMPERATURES_K)} K (one trajectory each, "
        f"frames split {frames_per_temperature(args.frames)}).",
        f"- {EQUIL_STEPS} equilibration steps discarded, then one frame every {STRIDE} steps "
        f"({STRIDE * TIMESTEP_FS:g} fs).",
        f"- Seed {args.seed}; trajectory RNG = `np.random.default_rng([seed, molecule_index, "
        "temperature_index])`. Files are gzip'ed with mtime=0 (byte-reproducible).", "",
        "## Results", "",
        f"- Requested frames per molecule: {args.frames}; SCF failures dropped: "
        f"{len(dropped)}" + (f" ({'; '.join(dropped)})" if dropped else "") + ".",
        *[f"- `{n}.extxyz.gz`: {len(results[n])} frames, {sizes[n]} bytes" for n in MOLECULES],
        f"- Total frames {sum(len(r) for r in results.values())}, total size "
        f"{sum(sizes.values())} bytes.",
        f"- Wall time {wall:.0f} s (MD {t_md:.0f} s) with {args.workers} B3LYP worker processes "
        f"({os.cpu_count()} CPUs, shared with other jobs).", "",
        *stats_table(results), "",
    ]
    return md


def main() -> None:
    """Parse arguments, sample, label, write files and provenance."""
    args = _parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.extra_level:
        from polyfid.datasets.demo_extra import extra_level, fd_check_extra
    if args.extra_level and args.check:
        fd_check_extra(args.out, args.extra_level, args.workers)
        return
    if args.extra_level:
        extra_level(args.out, args.extra_level, args.workers)
        return
    if args.check:
        fd_check(args.out, args.seed)
        return

    t0 = time.time()
    results, sizes, dropped, t_md = _sample_and_label(args)
    wall = time.time() - t0
    md = _provenance(args, results, sizes, dropped, wall, t_md)
    (args.out / "PROVENANCE.md").write_text("\n".join(md))
    print("\n".join(stats_table(results)))
    print(f"wall time {wall:.0f} s")


if __name__ == "__main__":
    main()
