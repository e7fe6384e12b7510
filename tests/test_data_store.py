"""The zarr store: round trip, missing labels, fsspec URLs, checksums, crash safety, append, references."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import zarr

from polyfid.data_shards.refs import fit_reference_energies, fit_reference_energies_from_numbers
from polyfid.data_shards.schema import Fidelity
from polyfid.data_shards.store import CorruptShardError, Store
from polyfid.data_shards.synthetic import random_structures
from polyfid.data_shards.writer import StoreWriter, Structure, write_structures

FIDS = [Fidelity("lo", rank=0, method="xtb"), Fidelity("hi", rank=1, method="b3lyp", basis="6-31g*")]


def _structures(n: int = 23, seed: int = 0) -> list[Structure]:
    return random_structures(n, seed, ("lo", "hi"), ("lo",), missing=0.4, periodic_every=4)


def _read_all(store: Store) -> dict[str, np.ndarray]:
    parts = [store.read_shard(k) for k in range(len(store.shards))]
    flat = {k: np.concatenate([p[k] for p in parts]) for k in ("atomic_numbers", "positions", "cell", "pbc",
                                                                "structure_id", "dataset")}
    for kind in ("energy", "forces"):
        for fid in parts[0][kind]:
            flat[f"{kind}/{fid}"] = np.concatenate([p[kind][fid] for p in parts])
    flat["n_atoms"] = np.concatenate([np.diff(p["offsets"]) for p in parts])
    return flat


def test_round_trip_with_missing_labels_and_periodic_frames(tmp_path: Path) -> None:
    structs = _structures()
    store = write_structures(tmp_path / "s", structs, FIDS, "ds", shard_size=7)
    assert [s.n_structures for s in store.shards] == [7, 7, 7, 2]
    assert store.n_structures == 23 and store.n_atoms == sum(len(s.numbers) for s in structs)
    assert store.fidelities == FIDS and store.datasets == ["ds"]
    assert store.elements == sorted({int(z) for s in structs for z in s.numbers})
    flat = _read_all(store)
    assert flat["atomic_numbers"].dtype == np.uint8
    np.testing.assert_array_equal(flat["atomic_numbers"], np.concatenate([s.numbers for s in structs]))
    np.testing.assert_array_equal(flat["positions"], np.concatenate([s.positions for s in structs]))
    np.testing.assert_array_equal(flat["n_atoms"], [len(s.numbers) for s in structs])
    np.testing.assert_array_equal(flat["cell"], np.stack([s.cell for s in structs]))
    np.testing.assert_array_equal(flat["pbc"], np.stack([s.pbc for s in structs]))
    assert flat["pbc"].any() and (~flat["pbc"]).any()  # both periodic and molecular frames
    np.testing.assert_array_equal(flat["structure_id"], np.arange(23))
    hi = np.array([s.energies.get("hi", np.nan) for s in structs])
    assert np.isnan(hi).any() and np.isfinite(hi).any()
    np.testing.assert_array_equal(flat["energy/hi"], hi)
    np.testing.assert_array_equal(flat["energy/lo"], [s.energies["lo"] for s in structs])
    np.testing.assert_allclose(flat["forces/lo"], np.concatenate([s.forces["lo"] for s in structs]), rtol=1e-6)
    assert np.isnan(flat["forces/hi"]).all() and flat["forces/hi"].shape == flat["positions"].shape
    assert store.verify() == []
    clone = pickle.loads(pickle.dumps(store))  # stores travel to Ray workers
    assert clone.fingerprint == store.fingerprint
    np.testing.assert_array_equal(clone.read_shard(3)["positions"], store.read_shard(3)["positions"])


def test_fsspec_urls(tmp_path: Path) -> None:
    structs = _structures(9)
    url = f"memory://polyfid-test/{tmp_path.name}"
    mem = write_structures(url, structs, FIDS, "ds", shard_size=4)
    local = write_structures(f"file://{tmp_path / 's'}", structs, FIDS, "ds", shard_size=4)
    assert mem.fingerprint == local.fingerprint == Store.open(tmp_path / "s").fingerprint
    np.testing.assert_array_equal(mem.read_shard(2)["positions"], local.read_shard(2)["positions"])
    assert Store.open(url).verify() == []


def test_open_names_the_path_when_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        Store.open(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="plain"):
        Store.open(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "bare"), mode="w")
    with pytest.raises(ValueError, match="bare.*not a polyfid store"):
        Store.open(tmp_path / "bare")


def test_writer_refuses_to_overwrite(tmp_path: Path) -> None:
    write_structures(tmp_path / "s", _structures(3), FIDS, "ds")
    with pytest.raises(FileExistsError, match="append=True"):
        StoreWriter(tmp_path / "s", FIDS)


def _chunk_files(shard_dir: Path, array: str) -> list[Path]:
    return sorted(p for p in (shard_dir / array / "c").rglob("*") if p.is_file())


def test_tampered_chunk_is_refused(tmp_path: Path) -> None:
    store = write_structures(tmp_path / "s", _structures(), FIDS, "ds", shard_size=7)
    name = store.shards[1].name
    chunk = _chunk_files(tmp_path / "s" / "shards" / name, "positions")[0]
    chunk.write_bytes(b"\x00garbage" * 8)
    with pytest.raises(CorruptShardError, match=f"{tmp_path / 's'}.*{name}"):
        store.read_shard(1)
    store.read_shard(0)  # the others still read
    assert store.verify() == [name]


def test_rewritten_data_fails_the_checksum(tmp_path: Path) -> None:
    store = write_structures(tmp_path / "s", _structures(), FIDS, "ds", shard_size=7)
    name = store.shards[2].name
    arr = zarr.open_array(str(tmp_path / "s" / "shards" / name / "energy" / "lo"), mode="r+")
    arr[0] = arr[0] + 1.0  # a well-formed chunk with different content
    with pytest.raises(CorruptShardError, match=f"{name}.*checksum"):
        store.read_shard(2)
    assert store.read_shard(2, verify=False)["energy"]["lo"].shape == (7,)
    assert store.verify() == [name]


def test_format_1_stores_still_read_verify_and_refuse_tampering(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import functools
    import json

    from zarr.codecs import BloscCodec

    from polyfid.data_shards import writer as writer_module
    from polyfid.data_shards.layout import shard_checksum

    structs = _structures()
    # what this polyfid wrote before format 2: Blosc/Zstd level 5 and sha256 over the raw bytes
    monkeypatch.setattr(writer_module, "compressor", lambda: BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"))
    monkeypatch.setattr(writer_module, "shard_checksum", functools.partial(shard_checksum, algorithm="sha256"))
    monkeypatch.setattr(writer_module, "FORMAT_VERSION", 1)
    old = write_structures(tmp_path / "old", structs, FIDS, "ds", shard_size=7)
    monkeypatch.undo()
    new = write_structures(tmp_path / "new", structs, FIDS, "ds", shard_size=7)
    assert old.manifest["format_version"] == 1 and new.manifest["format_version"] == 2
    assert {s.checksum.split(":")[0] for s in old.shards} == {"sha256"}
    assert {s.checksum.split(":")[0] for s in new.shards} == {"crc32c"}
    codec = [json.loads((tmp_path / d / "shards/shard-000000/positions/zarr.json").read_text())["codecs"][-1]
             ["configuration"]["cname"] for d in ("old", "new")]
    assert codec == ["zstd", "lz4"]
    assert old.verify() == [] and new.verify() == []
    a, b = _read_all(old), _read_all(new)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    arr = zarr.open_array(str(tmp_path / "old" / "shards" / "shard-000001" / "positions"), mode="r+")
    arr[0, 0] = arr[0, 0] + 1e-9  # still refused under the old algorithm
    assert old.verify() == ["shard-000001"]


def test_interrupted_write_leaves_no_visible_store(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path / "s", FIDS, shard_size=5)
    writer.add(_structures(12), "ds")  # two shards flushed, then the "process dies": no close()
    hidden = [p for p in tmp_path.iterdir() if p.name.startswith(".s.tmp-")]  # built beside, renamed on close
    assert len(hidden) == 1
    assert sorted(p.name for p in (hidden[0] / "shards").glob("shard-*")) == ["shard-000000", "shard-000001"]
    assert not (tmp_path / "s").exists()
    with pytest.raises(FileNotFoundError, match="no such store"):
        Store.open(tmp_path / "s")


def test_interrupted_append_leaves_the_store_as_it_was(tmp_path: Path) -> None:
    before = write_structures(tmp_path / "s", _structures(8), FIDS, "ds", shard_size=5)
    writer = StoreWriter(tmp_path / "s", FIDS, shard_size=5, append=True)
    writer.add(_structures(12, seed=1), "more")  # no close(): the manifest is not rewritten
    after = Store.open(tmp_path / "s")
    assert after.manifest == before.manifest and after.verify() == []


def test_failed_write_is_removed(tmp_path: Path) -> None:
    def gen():
        yield from _structures(12)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        write_structures(tmp_path / "s", gen(), FIDS, "ds", shard_size=5)
    assert not (tmp_path / "s").exists()


def test_append_adds_dataset_and_fidelity_without_touching_old_shards(tmp_path: Path) -> None:
    old = write_structures(tmp_path / "s", _structures(10), FIDS, "first", shard_size=4)
    old_shards = old.shards
    new_fid = Fidelity("ccsd", rank=2, method="CCSD(T)")
    extra = random_structures(6, 5, ("ccsd",), ("ccsd",), periodic_every=0)
    store = write_structures(tmp_path / "s", extra, [new_fid], "second", shard_size=4, append=True)
    assert store.shards[: len(old_shards)] == old_shards  # same names, counts and checksums
    assert store.verify() == []
    assert [f.name for f in store.fidelities] == ["lo", "hi", "ccsd"]
    assert store.datasets == ["first", "second"] and store.n_structures == 16
    assert store.fingerprint != old.fingerprint
    first = store.read_shard(0)
    assert np.isnan(first["energy"]["ccsd"]).all() and np.isnan(first["forces"]["ccsd"]).all()
    last = store.read_shard(len(store.shards) - 1)
    np.testing.assert_array_equal(last["structure_id"], [14, 15])  # ids continue
    np.testing.assert_array_equal(last["dataset"], [1, 1])
    np.testing.assert_array_equal(last["energy"]["ccsd"], [s.energies["ccsd"] for s in extra[4:]])
    refs = store.reference_energies
    assert set(refs["ccsd"]) == set(store.elements) and refs["lo"][7] == 0.0  # N is never labelled at "lo"
    assert {z: refs["lo"][z] for z in old.elements} == pytest.approx(old.reference_energies["lo"])
    with pytest.raises(ValueError, match="lo"):  # a known fidelity redescribed differently
        StoreWriter(tmp_path / "s", [Fidelity("lo", rank=5)], append=True)


def test_reference_fit_recovers_known_energies() -> None:
    rng = np.random.default_rng(0)
    truth = np.array([-13.6, -1027.0, -1484.0, -2040.0])
    comps = rng.integers(0, 8, size=(200, 4)).astype(float)
    energies = comps @ truth
    energies[::7] = np.nan  # unlabelled structures are skipped
    np.testing.assert_allclose(fit_reference_energies(comps, energies), truth, atol=1e-8)
    # rank-deficient: two elements always appear 2:1, so only 2*e0 + e1 is determined
    deficient = np.stack([2 * comps[:, 0], comps[:, 0], comps[:, 2]], axis=1)
    e = fit_reference_energies(deficient, deficient @ truth[:3])
    assert np.all(np.isfinite(e))
    np.testing.assert_allclose(deficient @ e, deficient @ truth[:3], rtol=1e-6)


def test_store_references_recover_per_element_energies(tmp_path: Path) -> None:
    truth = {1: -0.5, 6: -37.8, 7: -54.6, 8: -75.0}
    structs = random_structures(40, 3, ("lo",), (), periodic_every=0)
    for s in structs:
        s.energies["lo"] = float(sum(truth[int(z)] for z in s.numbers))
    store = write_structures(tmp_path / "s", structs, [Fidelity("lo")], "ds", shard_size=9)
    got = store.reference_energies["lo"]
    assert set(got) == set(store.elements)
    for z, e in got.items():
        assert e == pytest.approx(truth[z], abs=1e-6)
    fit = fit_reference_energies_from_numbers([s.numbers for s in structs], [s.energies["lo"] for s in structs])
    assert fit[8] == pytest.approx(-75.0, abs=1e-6)
