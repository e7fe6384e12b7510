"""ANI-style HDF5 and MD17 npz sources, and merging label sources into one row per structure."""

from __future__ import annotations

from pathlib import Path

import ase.io
import h5py
import numpy as np
import pytest
from ase import units
from ase.build import molecule

from polyfid.data_shards.ingest import IngestError, ingest
from polyfid.data_shards.reader import iter_all
from polyfid.data_shards.store import Store
from polyfid.data_shards.synthetic import random_atoms

KCAL = units.kcal / units.mol


def _flat(store: Store) -> dict[str, np.ndarray]:
    batches = list(iter_all([store], atom_budget=100_000))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _col(store: Store, fid: str) -> int:
    return [f.name for f in sorted(store.fidelities, key=lambda f: (f.rank, f.name))].index(fid)


def write_ani(path: Path, seed: int = 0, ccsd_every: int = 0, species: bool = False) -> list[dict]:
    """An ANI-1x-like file: a group per formula, wB97x energies (Hartree) and forces on every conformer,
    CCSD(T) energies on every `ccsd_every`-th (NaN elsewhere, as in ANI-1x). Returns the frames in order."""
    rng = np.random.default_rng(seed)
    frames = []
    with h5py.File(path, "w") as f:
        for name, n_conf in (("C2H6", 4), ("CH4", 2), ("H2O", 3)):  # h5py lists groups by name
            mol = molecule(name)
            coords = mol.positions[None] + rng.normal(scale=0.02, size=(n_conf, len(mol), 3))
            e = rng.normal(-40, 1, size=n_conf)
            frc = rng.normal(scale=0.05, size=(n_conf, len(mol), 3))
            g = f.create_group(name)
            if species:
                g["species"] = np.array([s.encode() for s in mol.get_chemical_symbols()])
            else:
                g["atomic_numbers"] = mol.numbers.astype(np.uint8)
            g["coordinates"] = coords
            g["wb97x_dz.energy"] = e
            g["wb97x_dz.forces"] = frc
            cc = np.full(n_conf, np.nan)
            for j in range(n_conf):
                idx = len(frames)
                if ccsd_every and idx % ccsd_every == 0:
                    cc[j] = e[j] - 0.01 * (j + 1)
                frames.append({"numbers": mol.numbers, "positions": coords[j], "wb97x": e[j], "forces": frc[j],
                               "ccsd": cc[j]})
            g["ccsd(t)_cbs.energy"] = cc
    return frames


def test_ani_hdf5_hartree_and_nan_as_missing(tmp_path: Path) -> None:
    frames = write_ani(tmp_path / "ani1x.h5", ccsd_every=3, species=True)
    store = ingest([str(tmp_path / "ani1x.h5")], str(tmp_path / "s"), "ani1x",
                   {"wb97x": "wb97x_dz.energy", "ccsd": "ccsd(t)_cbs.energy"}, {"wb97x": "wb97x_dz.forces"},
                   ranks={"ccsd": 1}, progress=False)
    assert store.n_structures == len(frames) == 9
    assert {f.name: f.source_unit for f in store.fidelities} == {"wb97x": "hartree", "ccsd": "hartree"}
    flat = _flat(store)
    np.testing.assert_array_equal(flat["atomic_numbers"], np.concatenate([f["numbers"] for f in frames]))
    np.testing.assert_allclose(flat["positions"], np.concatenate([f["positions"] for f in frames]))
    np.testing.assert_allclose(flat["energy"][:, _col(store, "wb97x")], [f["wb97x"] * units.Hartree for f in frames])
    np.testing.assert_allclose(flat["energy"][:, _col(store, "ccsd")], [f["ccsd"] * units.Hartree for f in frames])
    np.testing.assert_allclose(flat["forces"][:, _col(store, "wb97x")],
                               np.concatenate([f["forces"] for f in frames]) * units.Hartree, rtol=1e-6)


def test_ani_slice_and_bad_species(tmp_path: Path) -> None:
    frames = write_ani(tmp_path / "a.h5")
    store = ingest([f"{tmp_path / 'a.h5'}@2:7"], str(tmp_path / "s"), "ani", {"w": "wb97x_dz.energy"},
                   progress=False)
    np.testing.assert_allclose(_flat(store)["energy"][:, 0], [f["wb97x"] * units.Hartree for f in frames[2:7]])
    with h5py.File(tmp_path / "b.h5", "w") as f:
        g = f.create_group("XX")
        g["species"], g["coordinates"] = np.array([b"H", b"Xq"]), np.array([[[0, 0, 0], [0, 0, 1.0]]])
        g["e.energy"] = np.array([-1.0])
    with pytest.raises(IngestError, match=r"b\.h5:/XX: frame 0: field 'species': unknown element 'Xq'"):
        ingest([str(tmp_path / "b.h5")], str(tmp_path / "t"), "x", {"w": "e.energy"}, progress=False)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("style", ["rmd17", "md17"])
def test_md17_npz_kcal_per_mol(tmp_path: Path, style: str) -> None:
    atoms = random_atoms(1)[0]
    rng = np.random.default_rng(0)
    n = 7
    coords = atoms.positions[None] + rng.normal(scale=0.02, size=(n, len(atoms), 3))
    e, f = rng.normal(-1e5, 1, size=n), rng.normal(size=(n, len(atoms), 3))
    if style == "rmd17":
        np.savez(tmp_path / "m.npz", nuclear_charges=atoms.numbers, coords=coords, energies=e, forces=f)
        ekey, fkey = "energies", "forces"
    else:
        np.savez(tmp_path / "m.npz", z=atoms.numbers, R=coords, E=e[:, None], F=f)
        ekey, fkey = "E", "F"
    store = ingest([str(tmp_path / "m.npz")], str(tmp_path / "s"), "md17", {"ccsd": ekey}, {"ccsd": fkey},
                   progress=False)
    assert store.fidelities[0].source_unit == "kcal/mol"
    flat = _flat(store)
    np.testing.assert_allclose(flat["energy"][:, 0], e * KCAL)
    np.testing.assert_allclose(flat["forces"][:, 0], f.reshape(-1, 3) * KCAL, rtol=1e-6)
    np.testing.assert_allclose(flat["positions"], coords.reshape(-1, 3))


def test_geometry_merge_adds_a_level_of_theory_without_rewriting_shards(tmp_path: Path) -> None:
    """ANI-1ccx-style: CCSD(T) energies on a subset of the ANI-1x geometries, appended by geometry hash."""
    frames = write_ani(tmp_path / "ani1x.h5", seed=1)
    out = tmp_path / "s"
    before = ingest([str(tmp_path / "ani1x.h5")], str(out), "ani1x", {"wb97x": "wb97x_dz.energy"},
                    {"wb97x": "wb97x_dz.forces"}, shard_size=4, merge_on="geometry", progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*") if p.is_file()}
    subset = [1, 2, 8]  # shards 0 and 2; shard 1 (frames 4..7) gets nothing
    with h5py.File(tmp_path / "ani1ccx.h5", "w") as f:
        for k, j in enumerate(subset):
            g = f.create_group(f"m{k}")
            g["atomic_numbers"], g["coordinates"] = frames[j]["numbers"], frames[j]["positions"][None]
            g["ccsd(t)_cbs.energy"] = np.array([frames[j]["wb97x"] - 0.5])
    after = ingest([str(tmp_path / "ani1ccx.h5")], str(out), "ani1ccx", {"ccsd": "ccsd(t)_cbs.energy"},
                   ranks={"ccsd": 1}, append=True, merge_on="geometry", progress=False)
    assert after.n_structures == before.n_structures == 9 and after.datasets == ["ani1x"]
    assert after.shards[1] == before.shards[1] and after.verify() == []
    assert [s.energy for s in after.shards] == [("wb97x", "ccsd"), ("wb97x",), ("wb97x", "ccsd")]
    changed = [p for p, t in mtimes.items() if p.stat().st_mtime_ns != t]
    assert changed == []  # old arrays untouched: only new energy/ccsd arrays were added
    flat = _flat(after)
    want = np.full(9, np.nan)
    want[subset] = [(frames[j]["wb97x"] - 0.5) * units.Hartree for j in subset]
    np.testing.assert_allclose(flat["energy"][:, _col(after, "ccsd")], want)
    prov = after.manifest["provenance"][-1]
    assert prov["merged_into_store"] == 3 and prov["new_structures"] == 0
    with pytest.raises(IngestError, match="already has 'ccsd'"):  # a second time: refused, store unchanged
        ingest([str(tmp_path / "ani1ccx.h5")], str(out), "ani1ccx", {"ccsd": "ccsd(t)_cbs.energy"},
               ranks={"ccsd": 1}, append=True, merge_on="geometry", progress=False)
    assert Store.open(out).manifest == after.manifest


def test_id_merge_of_two_files_and_append(tmp_path: Path) -> None:
    atoms = random_atoms(6, seed=3)
    for i, a in enumerate(atoms):
        a.info["mol_id"] = f"m{i}"
        a.info["e_lo"] = -10.0 - i
    ase.io.write(tmp_path / "lo.extxyz", atoms)
    hi = [atoms[i].copy() for i in (4, 1)]
    for a in hi:
        a.info = {"mol_id": a.info["mol_id"], "e_hi": -20.0 - int(a.info["mol_id"][1:])}
        a.positions += 0.001  # same id, slightly different geometry: id matching does not care
    ase.io.write(tmp_path / "hi.extxyz", hi)
    out = tmp_path / "s"
    store = ingest([str(tmp_path / "lo.extxyz"), str(tmp_path / "hi.extxyz")], str(out), "d",
                   {"lo": "e_lo", "hi": "e_hi"}, merge_on="id:mol_id", shard_size=4, progress=False)
    assert store.n_structures == 6 and all(s.ids == ("mol_id",) for s in store.shards)
    e = _flat(store)["energy"]
    np.testing.assert_allclose(e[:, _col(store, "lo")], [-10.0 - i for i in range(6)])
    np.testing.assert_allclose(e[:, _col(store, "hi")], [np.nan, -21, np.nan, np.nan, -24, np.nan])
    extra = [atoms[2].copy(), atoms[0].copy()]
    extra[0].info = {"mol_id": "m2", "e_x": 1.0}
    extra[1].info = {"mol_id": "new", "e_x": 2.0}
    ase.io.write(tmp_path / "x.extxyz", extra)
    store = ingest([str(tmp_path / "x.extxyz")], str(out), "x", {"x": "e_x"}, append=True,
                   merge_on="id:mol_id", progress=False)
    assert store.n_structures == 7 and store.datasets == ["d", "x"] and store.verify() == []
    np.testing.assert_allclose(_flat(store)["energy"][:, _col(store, "x")], [np.nan, np.nan, 1.0] + [np.nan] * 3
                               + [2.0])
    with pytest.raises(IngestError, match=r"frame 0: field 'e_x'.*given twice"):
        ingest([str(tmp_path / "x.extxyz"), str(tmp_path / "x.extxyz")], str(tmp_path / "t"), "x",
               {"x": "e_x"}, merge_on="id:mol_id", progress=False)
    assert not (tmp_path / "t").exists()
