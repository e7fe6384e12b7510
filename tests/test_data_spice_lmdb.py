"""SPICE HDF5 and ASE-LMDB (fairchem's .aselmdb) sources: files written here in exactly those layouts."""

from __future__ import annotations

import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator

from polyfid.data_shards import parallel
from polyfid.data_shards.ingest import IngestError, ingest
from polyfid.data_shards.sources import read_frames, scan_frames, source_format
from polyfid.data_shards.store import Store

HARTREE_EV = 27.211386024367243  # eV, as ASE's units (CODATA 2014)
BOHR_A = 0.5291772105638411  # Å
SUBSETS = ("SPICE Dipeptides Single Points Dataset v1.3", "SPICE PubChem Set 1 Single Points Dataset v1.3")
SPICE_KEYS = {"energy": {"wb97m": "dft_total_energy"}, "forces": {"wb97m": "dft_total_gradient"}}


def write_spice(path: Path, n_conf: tuple[int, ...] = (3, 4, 2, 5), seed: int = 0) -> list[dict]:
    """A SPICE-2-like file: a group per molecule, Bohr conformations, Hartree energies, Hartree/Bohr gradients,
    the smiles and subset strings, and other per-conformation datasets. Returns the frames in file order."""
    rng = np.random.default_rng(seed)
    names = ("CH4", "H2O", "NH3", "CH3OH", "C2H6", "HCOOH")
    frames = []
    with h5py.File(path, "w") as f:
        for m, c in enumerate(n_conf):
            mol = molecule(names[m % len(names)])
            n = len(mol)
            g = f.create_group(f"mol{m:02d}")  # h5py lists groups by name: this is the file order
            g["atomic_numbers"] = mol.numbers.astype(np.int16)
            bohr = (mol.positions + rng.normal(0, 0.05, (c, n, 3))) / BOHR_A
            g["conformations"] = bohr.astype(np.float32)
            g["dft_total_energy"] = -40.0 * (m + 1) + rng.normal(0, 0.01, c)
            g["dft_total_gradient"] = rng.normal(0, 0.02, (c, n, 3)).astype(np.float32)
            g["formation_energy"] = rng.normal(0, 0.1, c)
            g["mbis_charges"] = rng.normal(0, 0.3, (c, n, 1)).astype(np.float32)
            g["scf_dipole"] = rng.normal(0, 0.3, (c, 3)).astype(np.float32)
            g.create_dataset("smiles", data=[mol.get_chemical_formula()], dtype=h5py.string_dtype())
            g.create_dataset("subset", data=[SUBSETS[m % 2]], dtype=h5py.string_dtype())
            for j in range(c):
                frames.append({"numbers": mol.numbers, "bohr": g["conformations"][j], "subset": SUBSETS[m % 2],
                               "energy": g["dft_total_energy"][j], "gradient": g["dft_total_gradient"][j]})
    return frames


def write_aselmdb(path: Path, n: int = 9, seed: int = 1) -> list:
    """An ASE-LMDB file as fairchem writes it: calculator energy/forces plus per-structure `data`."""
    from ase_db_backends.aselmdb import LMDBDatabase

    rng = np.random.default_rng(seed)
    frames = []
    db = LMDBDatabase(path)
    for i in range(n):
        a = molecule(("CH4", "H2O", "NH3")[i % 3])
        a.positions += rng.normal(0, 0.05, a.positions.shape)
        e, f = float(rng.normal(-100, 5)), rng.normal(0, 0.5, (len(a), 3))
        a.calc = SinglePointCalculator(a, energy=e, forces=f)
        data = {"e_hi": e - 1.0, "f_hi": 1.1 * f, "source": "omol-like"}
        db.write(a, key_value_pairs={"charge": 0}, data=data)
        frames.append((a.copy(), e, f, data))
    db.close()
    return frames


def _rows(store: Store) -> dict:
    """Every structure's arrays, shard after shard (positions, energy/<fid>, forces/<fid>, dataset)."""
    shards = [store.read_shard(k) for k in range(len(store.shards))]
    out = {k: np.concatenate([s[k] for s in shards]) for k in ("positions", "atomic_numbers", "dataset")}
    for kind in ("energy", "forces"):
        for fid in shards[0][kind]:
            out[f"{kind}/{fid}"] = np.concatenate([s[kind][fid] for s in shards])
    return out


def test_spice_units_and_subsets_by_hand(tmp_path: Path) -> None:
    frames = write_spice(tmp_path / "spice.hdf5")
    assert source_format(str(tmp_path / "spice.hdf5")) == "spice-h5"
    assert scan_frames(str(tmp_path / "spice.hdf5")) == (14, None)
    store = ingest([str(tmp_path / "spice.hdf5")], str(tmp_path / "s"), dataset="{subset}", progress=False,
                   **SPICE_KEYS)
    rows = _rows(store)
    # one structure by hand: conformation 1 of mol01 (frame 4); H2O, 3 atoms, atoms 3..5 of the store
    k, a = 4, slice(15 + 3, 15 + 6)  # after mol00 (CH4: 3 frames of 5 atoms) and mol01's frame 3 (3 atoms)
    fr = frames[k]
    assert rows["energy/wb97m"][k] == pytest.approx(fr["energy"] * HARTREE_EV, rel=1e-12)
    np.testing.assert_allclose(rows["positions"][a], fr["bohr"].astype(np.float64) * BOHR_A, rtol=1e-12)
    np.testing.assert_allclose(rows["forces/wb97m"][a], -fr["gradient"] * HARTREE_EV / BOHR_A, rtol=1e-6)
    # and all of them
    np.testing.assert_allclose(rows["energy/wb97m"], [f["energy"] * HARTREE_EV for f in frames], rtol=1e-12)
    np.testing.assert_allclose(rows["forces/wb97m"], np.concatenate([-f["gradient"] for f in frames])
                               * HARTREE_EV / BOHR_A, rtol=1e-6)
    np.testing.assert_array_equal(rows["atomic_numbers"], np.concatenate([f["numbers"] for f in frames]))
    # the subset is the dataset name, in the order first met
    assert store.datasets == list(SUBSETS)
    assert [store.datasets[d] for d in rows["dataset"]] == [f["subset"] for f in frames]
    prov = store.manifest["provenance"][0]
    assert list(prov["energy_unit"].values()) == ["hartree"] and list(prov["length_unit"].values()) == ["bohr"]


def test_ranges_read_their_own_frames(tmp_path: Path) -> None:
    write_spice(tmp_path / "spice.h5")
    write_aselmdb(tmp_path / "x.aselmdb")
    for path, n in ((tmp_path / "spice.h5", 14), (tmp_path / "x.aselmdb", 9)):
        whole = list(read_frames(str(path)))
        assert [i for i, _ in whole] == list(range(n))
        part = list(read_frames(f"{path}@2:7"))  # crosses SPICE's group boundaries (3, 4 conformations)
        assert [i for i, _ in part] == [2, 3, 4, 5, 6]
        for (i, fr), (_, ref) in zip(part, whole[2:7]):
            np.testing.assert_array_equal(fr.positions, ref.positions)
            assert fr.scalars.keys() == ref.scalars.keys()


def test_aselmdb_energy_forces_and_data_keys(tmp_path: Path) -> None:
    frames = write_aselmdb(tmp_path / "x.aselmdb")
    assert source_format(str(tmp_path / "x.aselmdb")) == "aselmdb"
    store = ingest([f"{tmp_path / 'x.aselmdb'}@1:"], str(tmp_path / "s"), dataset="omol",
                   energy={"pbe": "energy", "hi": "e_hi"}, forces={"pbe": "forces", "hi": "f_hi"},
                   ranks={"hi": 1}, progress=False)
    rows = _rows(store)
    frames = frames[1:]
    np.testing.assert_allclose(rows["energy/pbe"], [e for _, e, _, _ in frames], rtol=1e-12)
    np.testing.assert_allclose(rows["energy/hi"], [d["e_hi"] for *_, d in frames], rtol=1e-12)
    np.testing.assert_allclose(rows["forces/pbe"], np.concatenate([f for _, _, f, _ in frames]), rtol=1e-6)
    np.testing.assert_allclose(rows["forces/hi"], np.concatenate([d["f_hi"] for *_, d in frames]), rtol=1e-6)
    np.testing.assert_allclose(rows["positions"], np.concatenate([a.positions for a, *_ in frames]), rtol=1e-12)
    # a text field of `data` names the dataset too
    s2 = ingest([str(tmp_path / "x.aselmdb")], str(tmp_path / "s2"), dataset="fairchem/{source}",
                energy={"pbe": "energy"}, progress=False)
    assert s2.datasets == ["fairchem/omol-like"]


def _refused(inputs: list[str], out: Path, match: str, **kw) -> IngestError:
    with pytest.raises(IngestError, match=match) as err:
        ingest(inputs, str(out), dataset="d", progress=False, **kw)
    assert not out.exists() and not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())
    return err.value


def test_spice_bad_inputs_write_nothing(tmp_path: Path) -> None:
    src = tmp_path / "spice.hdf5"
    write_spice(src)
    out = tmp_path / "out"
    with h5py.File(src, "r+") as f:  # frame 8 = mol02's conformation 1
        f["mol02/dft_total_energy"][1] = np.nan
    err = _refused([str(src)], out, "not finite", **SPICE_KEYS)
    assert (err.file, err.index, err.field) == (f"{src}:/mol02", 8, "dft_total_energy")
    # not mapped, so not read: the same file ingests its forces
    assert ingest([str(src)], str(tmp_path / "ok"), "d", {}, {"wb97m": "dft_total_gradient"},
                  progress=False).n_structures == 14

    write_spice(src)
    with h5py.File(src, "r+") as f:  # a gradient for 4 atoms on a 3-atom molecule
        del f["mol01/dft_total_gradient"]
        f["mol01/dft_total_gradient"] = np.zeros((4, 4, 3))
    err = _refused([str(src)], out, r"has shape \(4, 3\), expected \(3, 3\)", **SPICE_KEYS)
    assert (err.file, err.index, err.field) == (f"{src}:/mol01", 3, "dft_total_gradient")

    write_spice(src)
    with h5py.File(src, "r+") as f:  # one gradient row short
        del f["mol03/dft_total_gradient"]
        f["mol03/dft_total_gradient"] = np.zeros((4, 6, 3))
    err = _refused([str(src)], out, "one row per conformation", **SPICE_KEYS)
    assert (err.file, err.index, err.field) == (f"{src}:/mol03", 9, "dft_total_gradient")

    data = src.read_bytes()
    (tmp_path / "cut.hdf5").write_bytes(data[: len(data) // 2])
    err = _refused([str(tmp_path / "cut.hdf5")], out, "not a readable HDF5 file", **SPICE_KEYS)
    assert (err.file, err.field) == (str(tmp_path / "cut.hdf5"), "format")
    (tmp_path / "empty.hdf5").write_bytes(b"")
    _refused([str(tmp_path / "empty.hdf5")], out, "input is empty", **SPICE_KEYS)
    with h5py.File(tmp_path / "nogroups.hdf5", "w"):
        pass
    _refused([str(tmp_path / "nogroups.hdf5")], out, "input is empty", **SPICE_KEYS)
    # a missing subset for the dataset template
    write_spice(src)
    with h5py.File(src, "r+") as f:
        del f["mol02/subset"]
    with pytest.raises(IngestError, match="needs a text field 'subset'") as info:
        ingest([str(src)], str(out), dataset="{subset}", progress=False, **SPICE_KEYS)
    assert info.value.index == 7 and not out.exists()


def test_aselmdb_bad_inputs_write_nothing(tmp_path: Path) -> None:
    from ase_db_backends.aselmdb import LMDBDatabase

    src, out = tmp_path / "x.aselmdb", tmp_path / "out"
    write_aselmdb(src)
    keys = {"energy": {"pbe": "energy", "hi": "e_hi"}, "forces": {"pbe": "forces", "hi": "f_hi"}}
    db = LMDBDatabase(src)
    db.update(4, data={"e_hi": float("nan")})  # row id 4 = frame 3
    db.close()
    err = _refused([str(src)], out, "not finite", **keys)
    assert (err.file, err.index, err.field) == (str(src), 3, "e_hi")

    write_aselmdb(tmp_path / "y.aselmdb")
    db = LMDBDatabase(tmp_path / "y.aselmdb")
    db.update(6, data={"f_hi": np.zeros((2, 3))})  # frame 5: an NH3 (4 atoms)
    db.close()
    err = _refused([str(tmp_path / "y.aselmdb")], out, r"has shape \(2, 3\), expected \(4, 3\)", **keys)
    assert (err.index, err.field) == (5, "f_hi")

    data = (tmp_path / "x.aselmdb").read_bytes()
    for cut, why in ((4096, "not a readable ASE-LMDB file"), (len(data) // 2, "truncated ASE-LMDB file")):
        (tmp_path / "cut.aselmdb").write_bytes(data[:cut])  # unguarded, reading past the end would be a SIGBUS
        err = _refused([str(tmp_path / "cut.aselmdb")], out, why, **keys)
        assert (err.file, err.field) == (str(tmp_path / "cut.aselmdb"), "format")
    (tmp_path / "empty.aselmdb").write_bytes(b"")
    _refused([str(tmp_path / "empty.aselmdb")], out, "input is empty", **keys)
    LMDBDatabase(tmp_path / "none.aselmdb").close()  # a valid database with no rows
    _refused([str(tmp_path / "none.aselmdb")], out, "input is empty", **keys)


def test_ray_parallel_ingest_equals_serial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """workers=2 with Ray running: tasks (Ray's among them) read their own ranges; the store equals a serial one."""
    import ray

    write_spice(tmp_path / "spice.hdf5", n_conf=(3, 4, 2, 5, 3, 4))
    write_aselmdb(tmp_path / "x.aselmdb", n=11)
    spice, lmdb = str(tmp_path / "spice.hdf5@1:20"), str(tmp_path / "x.aselmdb")
    jobs = {"spice": ([spice], dict(dataset="{subset}", **SPICE_KEYS)),
            "lmdb": ([lmdb], dict(dataset="omol", energy={"pbe": "energy", "hi": "e_hi"},
                                  forces={"pbe": "forces", "hi": "f_hi"}))}
    for name, (inputs, kw) in jobs.items():
        ingest(inputs, str(tmp_path / f"{name}-serial"), shard_size=4, progress=False, **kw)
    # this process waits (from its second task on) until a Ray worker has written a shard, so both do
    real, pid, marker, calls = parallel.write_task, os.getpid(), tmp_path / "ray-ran", []

    def task(*args):
        if os.getpid() != pid:
            marker.touch()
        elif calls.append(1) or len(calls) > 1:
            deadline = time.monotonic() + 120
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return real(*args)

    monkeypatch.setattr(parallel, "write_task", task)
    bad = tmp_path / "bad.hdf5"
    write_spice(bad, n_conf=(3, 4, 2, 5, 3, 4))
    with h5py.File(bad, "r+") as f:
        f["mol04/dft_total_energy"][2] = np.inf  # frame 16: in the 4th task
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        calls.clear()
        with pytest.raises(IngestError, match="not finite") as err:
            ingest([str(bad)], str(tmp_path / "bad-par"), dataset="d", shard_size=4, workers=2, progress=False,
                   **SPICE_KEYS)
        assert (err.value.file, err.value.index) == (f"{bad}:/mol04", 16)
        assert not (tmp_path / "bad-par").exists()
        for name, (inputs, kw) in jobs.items():
            calls.clear()
            marker.unlink(missing_ok=True)
            ingest(inputs, str(tmp_path / f"{name}-par"), shard_size=4, workers=2, progress=False, **kw)
    finally:
        ray.shutdown()
    for name in jobs:
        serial, par = Store.open(tmp_path / f"{name}-serial"), Store.open(tmp_path / f"{name}-par")
        stats = par.manifest["provenance"][0]["parallel"]
        assert stats["tasks"] == len(par.shards) >= 3 and stats["ray_tasks"] >= 1
        assert [s.checksum for s in par.shards] == [s.checksum for s in serial.shards]
        assert par.datasets == serial.datasets and par.verify() == []
        a, b = _rows(serial), _rows(par)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert Store.open(tmp_path / "spice-par").datasets == list(SUBSETS)
