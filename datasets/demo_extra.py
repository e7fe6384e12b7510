"""The demo's third level of theory, added to an existing file: ``python datasets/demo_data.py --out
data_shards/demo --extra-level formic_acid [--check]`` (see demo_data.py).

It labels the formic acid frames at ``wb97x_631gs`` (wB97X/6-31G*, PySCF) keeping every existing column and the
frame order (checked bit-for-bit after writing), writes the O-H bond and H-O-C=O torsion scans of the
GFN2-xTB-optimised geometry, checks the level's forces by finite differences, and appends both sections to
PROVENANCE.md and FD_CHECK.md.
"""
from __future__ import annotations

import os
import shlex
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from tqdm import tqdm

from polyfid.datasets.demo_labels import (EXTRA, EXTRA_BASIS, EXTRA_XC, FD_EXTRA_MARKER, HIGH, LOW, MAX_EXTRA_WORKERS,
                                        SCAN_BOND, SCAN_TORSION, SCF_CONV_TOL, _extra_task, gfn2_label,
                                        optimised_start, versions, write_extxyz_gz)


def _replace_extra_section(path: Path, section: str) -> None:
    """Append ``section`` to ``path``, replacing an earlier extra-level section if present."""
    old = path.read_text() if path.exists() else ""
    if FD_EXTRA_MARKER in old:
        old = old[:old.index(FD_EXTRA_MARKER)]
    path.write_text(old.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n")


def fd_check_extra(out: Path, name: str, workers: int, h: float = 1e-3,
                   frame_ids: tuple[int, ...] = (0, 99)) -> None:
    """Finite-difference check of the extra level on two frames of ``<out>/<name>.extxyz.gz``."""
    frames = ase.io.read(out / f"{name}.extxyz.gz", ":")
    comps = [(1, 0), (0, 1), (3, 2)]  # (atom, xyz): C, hydroxyl O, hydroxyl H
    tasks, keys = [], []
    for fi in frame_ids:
        atoms = frames[fi]
        for gr in (False, True):  # analytic forces as labelled / with the grid-response term
            tasks.append((atoms.numbers, atoms.positions.copy(), 1e-11, gr))
            keys.append((fi, None, int(gr)))
        for a, c in comps:
            for s in (+1, -1):
                x = atoms.positions.copy()
                x[a, c] += s * h
                tasks.append((atoms.numbers, x, 1e-11, False))
                keys.append((fi, (a, c), s))
    with Pool(min(workers, MAX_EXTRA_WORKERS)) as pool:
        res = dict(zip(keys, tqdm(pool.imap(_extra_task, tasks, chunksize=1), total=len(tasks),
                                  desc=f"fd {EXTRA}")))
    assert all(r[2] for r in res.values()), "SCF not converged in the FD check"
    lines = [f"{FD_EXTRA_MARKER}: `{EXTRA}` ({name}, frames {', '.join(map(str, frame_ids))})", "",
             f"wB97X/6-31G* (PySCF RKS, conv_tol 1e-11), dataset frames {list(frame_ids)} of "
             f"`{name}.extxyz.gz` (MD geometries, not rattled), central differences, h = {h} A. "
             "Command: `python datasets/demo_data.py --out data_shards/demo "
             f"--extra-level {name} --check`. F_analytic is computed as the labels are "
             "(`grid_response=False`); F_analytic+gr adds PySCF's DFT-grid response term "
             "(`grid_response=True`), which the labels (like `b3lyp_631gs`) omit.", "",
             "| level | frame | atom | xyz | F_analytic (eV/A) | F_fd (eV/A) | abs diff | "
             "F_analytic+gr (eV/A) | abs diff +gr |",
             "|---|---|---|---|---|---|---|---|---|"]
    for fi in frame_ids:
        forces, forces_gr = res[(fi, None, 0)][1], res[(fi, None, 1)][1]
        sym = frames[fi].get_chemical_symbols()
        for a, c in comps:
            f_fd = -(res[(fi, (a, c), +1)][0] - res[(fi, (a, c), -1)][0]) / (2 * h)
            lines.append(f"| {EXTRA} | {fi} | {a} ({sym[a]}) | {'xyz'[c]} | {forces[a, c]:.6f} | "
                         f"{f_fd:.6f} | {abs(forces[a, c] - f_fd):.2e} | {forces_gr[a, c]:.6f} | "
                         f"{abs(forces_gr[a, c] - f_fd):.2e} |")
    net = [max(np.abs(res[(fi, None, gr)][1].sum(0)).max() for fi in frame_ids) for gr in (0, 1)]
    lines += ["", "Max abs net force (sum over atoms) on these frames: "
              f"{net[0]:.2e} eV/A as labelled, {net[1]:.2e} eV/A with the grid response."]
    section = "\n".join(lines) + "\n"
    print(section)
    _replace_extra_section(out / "FD_CHECK.md", section)


def _info_equal(a: object, b: object) -> bool:
    """Exact (bit-for-bit, type-preserving) equality of two info values / arrays."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, (float, np.floating)) and isinstance(b, (float, np.floating)):
        return type(a) is type(b) and np.float64(a).tobytes() == np.float64(b).tobytes()
    return type(a) is type(b) and a == b


def verify_unchanged(original: list[Atoms], rewritten: list[Atoms], new_keys: set[str]) -> None:
    """Assert every original info/array entry and the frame order survive bit-for-bit."""
    assert len(original) == len(rewritten), (len(original), len(rewritten))
    for i, (o, r) in enumerate(zip(original, rewritten)):
        assert set(r.info) - set(o.info) <= new_keys and set(o.info) <= set(r.info), i
        assert set(r.arrays) - set(o.arrays) <= new_keys and set(o.arrays) <= set(r.arrays), i
        for k, v in o.info.items():
            assert _info_equal(v, r.info[k]), (i, k, v, r.info[k])
        for k, v in o.arrays.items():
            assert _info_equal(v, r.arrays[k]), (i, k)
        assert _info_equal(o.pbc, r.pbc) and _info_equal(o.cell.array, r.cell.array), i


def scan_frames(name: str) -> list[Atoms]:
    """O-H bond scan and H-O-C=O torsion scan of the GFN2-xTB-optimised geometry (only H3 moves)."""
    assert name == "formic_acid", "scans are defined for formic acid only"
    ref = optimised_start(name)
    ref = Atoms(ref.numbers, positions=ref.positions.copy())
    o, c, o2, h = 0, 1, 2, 3
    assert ref.get_chemical_symbols()[:4] == ["O", "C", "O", "H"]
    frames: list[Atoms] = []
    unit = (ref.positions[h] - ref.positions[o]) / ref.get_distance(o, h)
    for d in SCAN_BOND:
        a = ref.copy()
        a.positions[h] = a.positions[o] + d * unit
        a.info.update(molecule=name, scan="bond", scan_value=float(d), scan_unit="Angstrom",
                      scan_coord="O0-H3", scan_index=len(frames))
        frames.append(a)
    for phi in SCAN_TORSION:
        a = ref.copy()
        a.set_dihedral(o2, c, o, h, float(phi))  # moves only atom h, about the C1-O0 axis
        assert abs(((a.get_dihedral(h, o, c, o2) - phi + 180.0) % 360.0) - 180.0) < 1e-6
        a.info.update(molecule=name, scan="torsion", scan_value=float(phi), scan_unit="degree",
                      scan_coord="H3-O0-C1=O2", scan_index=len(frames))
        frames.append(a)
    return frames


def extra_level(out: Path, name: str, workers: int) -> None:
    """Add the ``EXTRA`` level to ``<out>/<name>.extxyz.gz`` and write the scans file."""
    t0 = time.time()
    nproc = min(workers, MAX_EXTRA_WORKERS)
    path = out / f"{name}.extxyz.gz"
    frames, scans, scan_path = _add_extra_labels(path, out, name, nproc)
    wall = time.time() - t0
    md = _extra_provenance(name, path, frames, scans, scan_path, nproc, wall)
    _replace_extra_section(out / "PROVENANCE.md", "\n".join(md))
    print("\n".join(md))


def _add_extra_labels(path: Path, out: Path, name: str, nproc: int) -> tuple[list[Atoms], list[Atoms], Path]:
    """Label the file's frames and the scans at ``EXTRA``, write both files and check the rest is unchanged."""
    original = ase.io.read(path, ":")
    for f in original:  # re-running: drop an earlier extra level, recompute it
        f.info.pop(f"energy_{EXTRA}", None)
        if f"forces_{EXTRA}" in f.arrays:
            del f.arrays[f"forces_{EXTRA}"]
    frames = [f.copy() for f in original]
    scans = scan_frames(name)
    for f in scans:
        e, frc = gfn2_label(f.numbers, f.positions)
        f.info[f"energy_{LOW}"] = e
        f.arrays[f"forces_{LOW}"] = frc
    todo = frames + scans
    with Pool(nproc) as pool:
        res = list(tqdm(pool.imap(_extra_task, [(f.numbers, f.positions.copy()) for f in todo],
                                  chunksize=1), total=len(todo), desc="wB97X/6-31G*"))
    failed = [i for i, r in enumerate(res) if not r[2]]
    assert not failed, f"SCF not converged for {failed}"
    for f, (e, frc, _) in zip(todo, res):
        f.info[f"energy_{EXTRA}"] = e
        f.arrays[f"forces_{EXTRA}"] = frc
    write_extxyz_gz(frames, path)
    new_keys = {f"energy_{EXTRA}", f"forces_{EXTRA}"}
    reread = ase.io.read(path, ":")
    verify_unchanged(original, reread, new_keys)
    for f, r in zip(frames, reread):
        assert r.info[f"energy_{EXTRA}"] == f.info[f"energy_{EXTRA}"]
        assert np.allclose(r.arrays[f"forces_{EXTRA}"], f.arrays[f"forces_{EXTRA}"], atol=1e-7)
    scan_path = out / f"{name}_scans.extxyz.gz"
    write_extxyz_gz(scans, scan_path)
    assert len(ase.io.read(scan_path, ":")) == len(scans)
    return frames, scans, scan_path


def _extra_provenance(name: str, path: Path, frames: list[Atoms], scans: list[Atoms], scan_path: Path, nproc: int,
                      wall: float) -> list[str]:
    """The PROVENANCE.md section of the ``EXTRA`` level."""
    v = versions()
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    e_x = np.array([f.info[f"energy_{EXTRA}"] for f in frames])
    dfh = np.concatenate([np.abs(f.arrays[f"forces_{EXTRA}"] - f.arrays[f"forces_{HIGH}"]).ravel()
                          for f in frames])
    dfl = np.concatenate([np.abs(f.arrays[f"forces_{EXTRA}"] - f.arrays[f"forces_{LOW}"]).ravel()
                          for f in frames])

    def scan_row(kind: str) -> str:
        sel = [f for f in scans if f.info["scan"] == kind]
        el = np.array([f.info[f"energy_{LOW}"] for f in sel])
        ex = np.array([f.info[f"energy_{EXTRA}"] for f in sel])
        xs = np.array([f.info["scan_value"] for f in sel])
        return (f"| {kind} ({sel[0].info['scan_coord']}) | {len(sel)} | {xs.min():g} .. "
                f"{xs.max():g} {sel[0].info['scan_unit']} | {np.ptp(el):.3f} "
                f"(min at {xs[el.argmin()]:g}) | {np.ptp(ex):.3f} (min at {xs[ex.argmin()]:g}) |")

    md = [
        f"{FD_EXTRA_MARKER}: `{EXTRA}` ({name} only)", "",
        "Added to the existing file (frames, order and all earlier columns unchanged, checked "
        "bit-for-bit by re-reading with `ase.io.read`). Exact command:", "",
        f"    {cmd}", "",
        f"- `{EXTRA}`: wB97X/6-31G*, the ANI-1x functional and basis. PySCF {v['pyscf']} "
        f"(libxc {v['libxc']}) xc `{EXTRA_XC}` = libxc HYB_GGA_XC_WB97X (id 464; Chai & "
        "Head-Gordon, JCP 128, 084106 (2008); range-separated hybrid, omega 0.3 bohr^-1, "
        "short-range HF 0.157706, long-range HF 1.0). Same SCF settings as `b3lyp_631gs`: "
        f"restricted Kohn-Sham, neutral singlet, basis `{EXTRA_BASIS}` (PySCF default spherical "
        f"5d; Gaussian/ANI-1x 6-31G(d) uses Cartesian 6d), default grids (level 3), conv_tol "
        f"{SCF_CONV_TOL:g}, max_cycle 100, analytic gradients via `nuc_grad_method()` (no grid "
        "response), no symmetry. Not a reproduction of the ANI-1x numbers (different code, grid "
        "and d-function convention).",
        f"- Keys: `info['energy_{EXTRA}']` (eV, total energy), `arrays['forces_{EXTRA}']` (eV/A), "
        "same conventions as the other levels. Labels computed on the positions as stored in the "
        "file (8 decimals), as read back by `ase.io.read`.",
        f"- `{name}.extxyz.gz`: {len(frames)} frames, {path.stat().st_size} bytes; SCF failures 0. "
        f"E range {e_x.min():.3f} .. {e_x.max():.3f} eV (span {np.ptp(e_x):.3f}); mean "
        f"abs(F_{EXTRA} - F_{HIGH}) {dfh.mean():.4f} eV/A, mean abs(F_{EXTRA} - F_{LOW}) "
        f"{dfl.mean():.4f} eV/A.",
        f"- `{scan_path.name}` ({len(scans)} frames, {scan_path.stat().st_size} bytes; loader "
        "`polyfid.data_shards.demo.demo_scans()`): reference scans of the GFN2-xTB-optimised "
        "geometry (ASE g2 HCOOH, BFGS fmax 0.01 eV/A, the same start geometry as the MD; syn "
        "conformer, H-O-C=O = 0 deg), moving only the hydroxyl H (atom 3). Atom order O0 "
        "(hydroxyl), C1, O2 (carbonyl), H3 (hydroxyl), H4. Bond scan: O0-H3 distance "
        f"{SCAN_BOND[0]:g} .. {SCAN_BOND[-1]:g} A, {len(SCAN_BOND)} points, H3 moved along the "
        "optimised O-H direction. Torsion scan: dihedral H3-O0-C1=O2 "
        f"{SCAN_TORSION[0]:g} .. {SCAN_TORSION[-1]:g} deg, {len(SCAN_TORSION)} points (360 "
        "repeats 0), H3 rotated about the C1-O0 axis (`Atoms.set_dihedral`). Info: `molecule`, "
        "`scan` ('bond'/'torsion'), `scan_value`, `scan_unit`, `scan_coord`, `scan_index`, "
        f"`energy_{LOW}`, `energy_{EXTRA}`; arrays `forces_{LOW}`, `forces_{EXTRA}`.",
        f"- Wall time {wall:.0f} s with {nproc} wB97X worker processes ({os.cpu_count()} CPUs, "
        "shared with other jobs). Finite-difference check: `--extra-level "
        f"{name} --check`, see `FD_CHECK.md`.",
        "- A full regeneration (`--out data_shards/demo` without `--extra-level`) rewrites "
        f"`{name}.extxyz.gz` without this level and drops this section; rerun this command after it.",
        "",
        "| scan | points | range | E span gfn2_xtb (eV) | E span wb97x_631gs (eV) |",
        "|---|---|---|---|---|",
        scan_row("bond"), scan_row("torsion"), "",
    ]
    return md
