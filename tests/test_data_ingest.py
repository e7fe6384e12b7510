"""Ingest from extxyz, extxyz.gz@slice and ASE db: labels, unit conversion, and errors that leave nothing."""

from __future__ import annotations

from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator

from polyfid.data_shards.ingest import IngestError, ingest
from polyfid.data_shards.reader import iter_all
from polyfid.data_shards.store import Store
from polyfid.data_shards.synthetic import random_atoms

E_MAP = {"lo": "energy_lo", "hi": "energy_hi"}
F_MAP = {"lo": "forces_lo"}


def _frames(n: int = 12, seed: int = 0) -> list[Atoms]:
    """Molecules and periodic cells; 'hi' energies on every third frame only, 'lo' forces on all."""
    rng = np.random.default_rng(seed)
    frames = random_atoms(n, seed, periodic_every=4)
    for i, a in enumerate(frames):
        a.info["energy_lo"] = float(rng.normal(-100, 5))
        if i % 3 == 0:
            a.info["energy_hi"] = float(rng.normal(-200, 5))
        a.arrays["forces_lo"] = rng.normal(size=(len(a), 3))
    return frames


def _flat(store: Store) -> dict[str, np.ndarray]:
    batches = list(iter_all([store], atom_budget=10_000))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _check(store: Store, frames: list[Atoms], e_scale: float = 1.0) -> None:
    flat = _flat(store)
    fids = [f.name for f in sorted(store.fidelities, key=lambda f: (f.rank, f.name))]
    lo, hi = fids.index("lo"), fids.index("hi")
    np.testing.assert_allclose(flat["positions"], np.concatenate([a.positions for a in frames]), atol=1e-7)
    np.testing.assert_array_equal(flat["atomic_numbers"], np.concatenate([a.numbers for a in frames]))
    np.testing.assert_array_equal(flat["pbc"], np.stack([a.pbc for a in frames]))
    np.testing.assert_allclose(flat["cell"], np.stack([a.cell.array for a in frames]), atol=1e-7)
    np.testing.assert_allclose(flat["energy"][:, lo], [a.info["energy_lo"] * e_scale for a in frames])
    want_hi = [a.info.get("energy_hi", np.nan) * e_scale for a in frames]
    np.testing.assert_allclose(flat["energy"][:, hi], want_hi)  # NaN where the key is absent
    np.testing.assert_allclose(flat["forces"][:, lo], np.concatenate([a.arrays["forces_lo"] for a in frames])
                               * e_scale, rtol=1e-6)
    assert np.isnan(flat["forces"][:, hi]).all()


def test_ingest_extxyz(tmp_path: Path) -> None:
    frames = _frames()
    ase.io.write(tmp_path / "a.extxyz", frames)
    store = ingest([str(tmp_path / "a.extxyz")], str(tmp_path / "s"), "md", E_MAP, F_MAP, ranks={"hi": 1},
                   shard_size=5, progress=True)
    assert store.n_structures == 12 and len(store.shards) == 3
    assert {f.name: f.rank for f in store.fidelities} == {"lo": 0, "hi": 1}
    _check(store, frames)
    assert store.manifest["provenance"][0]["inputs"] == [str(tmp_path / "a.extxyz")]


def test_ingest_gz_with_slice_and_calculator_results(tmp_path: Path) -> None:
    frames = _frames(20)
    for a in frames:  # 'lo' as ASE calculator results: extxyz stores these as energy=/forces
        a.calc = SinglePointCalculator(a, energy=a.info.pop("energy_lo"), forces=a.arrays.pop("forces_lo"))
    ase.io.write(tmp_path / "a.extxyz.gz", frames)
    store = ingest([f"{tmp_path / 'a.extxyz.gz'}@2:14:3"], str(tmp_path / "s"), "md",
                   {"lo": "energy", "hi": "energy_hi"}, {"lo": "forces"}, progress=False)
    chosen = frames[2:14:3]
    assert store.n_structures == len(chosen) == 4
    for a in chosen:
        a.info["energy_lo"], a.arrays["forces_lo"] = a.calc.results["energy"], a.calc.results["forces"]
    _check(store, chosen)


def test_gz_input_is_decompressed_once_not_seeked_back(tmp_path: Path, monkeypatch) -> None:
    """ASE seeks back to every frame; on a GzipFile each backward seek decompresses from the start (O(N^2)).
    The reader must read a .gz without seeking in it, and give the same frames as the plain file."""
    import gzip

    from polyfid.data_shards.sources import read_frames

    frames = _frames(30)
    ase.io.write(tmp_path / "a.extxyz", frames)
    ase.io.write(tmp_path / "a.extxyz.gz", frames)
    seeks = []
    real_seek = gzip.GzipFile.seek
    monkeypatch.setattr(gzip.GzipFile, "seek", lambda self, *a, **k: seeks.append(a) or real_seek(self, *a, **k))
    got = list(read_frames(str(tmp_path / "a.extxyz.gz")))
    assert seeks == []
    plain = list(read_frames(str(tmp_path / "a.extxyz")))
    assert [i for i, _ in got] == list(range(30))
    for (_, f), (_, g) in zip(got, plain):
        np.testing.assert_array_equal(f.positions, g.positions)
        assert f.scalars == g.scalars


def test_ingest_ase_db_and_append(tmp_path: Path) -> None:
    frames = _frames(8)
    with ase.db.connect(tmp_path / "a.db") as db:
        for a in frames:
            kvp = {k: v for k, v in a.info.items() if k.startswith("energy")}
            db.write(Atoms(a.numbers, a.positions, cell=a.cell, pbc=a.pbc), key_value_pairs=kvp,
                     data={"forces_lo": a.arrays["forces_lo"]})
    ase.io.write(tmp_path / "b.extxyz", _frames(6, seed=1))
    first = ingest([str(tmp_path / "b.extxyz")], str(tmp_path / "s"), "other", {"lo": "energy_lo"}, F_MAP,
                   progress=False)
    store = ingest([f"{tmp_path / 'a.db'}@0:8"], str(tmp_path / "s"), "db", E_MAP, F_MAP, ranks={"hi": 1},
                   append=True, shard_size=4, progress=False)
    assert store.datasets == ["other", "db"] and store.n_structures == 14
    assert store.shards[0] == first.shards[0]
    only_db = [b for b in _flat_batches(store) if (b["dataset"] == 1).all()]
    assert sum(len(b["n_atoms"]) for b in only_db) == 8
    np.testing.assert_allclose(np.concatenate([b["energy"][:, 1] for b in only_db]),
                               [a.info.get("energy_hi", np.nan) for a in frames])


def _flat_batches(store: Store) -> list:
    with pytest.warns(UserWarning, match="atom_budget"):
        return list(iter_all([store], atom_budget=1))  # one structure per batch


@pytest.mark.parametrize("unit,scale", [("hartree", units.Hartree), ("kcal/mol", units.kcal / units.mol)])
def test_unit_conversion(tmp_path: Path, unit: str, scale: float) -> None:
    frames = _frames(5)
    ase.io.write(tmp_path / "a.extxyz", frames)
    store = ingest([str(tmp_path / "a.extxyz")], str(tmp_path / "s"), "md", E_MAP, F_MAP, energy_unit=unit,
                   progress=False)
    _check(store, frames, e_scale=scale)
    assert {f.source_unit for f in store.fidelities} == {unit}


def test_bohr_positions(tmp_path: Path) -> None:
    frames = _frames(3)
    ase.io.write(tmp_path / "a.extxyz", frames)
    store = ingest([str(tmp_path / "a.extxyz")], str(tmp_path / "s"), "md", E_MAP, F_MAP, energy_unit="hartree",
                   length_unit="bohr", progress=False)
    flat = _flat(store)
    np.testing.assert_allclose(flat["positions"], np.concatenate([a.positions for a in frames]) * units.Bohr,
                               atol=1e-7)
    lo = 1  # columns are ordered by (rank, name): hi, lo
    np.testing.assert_allclose(flat["forces"][:, lo], np.concatenate([a.arrays["forces_lo"] for a in frames])
                               * units.Hartree / units.Bohr, rtol=1e-6)


def _bad(kind: str, frames: list[Atoms]) -> str:
    """Spoil frame 3 in one way; returns the field the error must name."""
    a = frames[3]
    if kind == "element":
        a.numbers[0] = 0
        return "numbers"
    if kind == "nan":
        a.info["energy_hi"] = float("nan")
        return "energy_hi"
    if kind == "inf_forces":
        a.arrays["forces_lo"][1, 2] = np.inf
        return "forces_lo"
    a.arrays["forces_lo"] = np.zeros((len(a), 2))
    return "forces_lo"


@pytest.mark.parametrize("kind", ["element", "nan", "inf_forces", "shape"])
@pytest.mark.parametrize("append", [False, True])
def test_bad_frame_names_file_index_field_and_leaves_nothing(tmp_path: Path, kind: str, append: bool) -> None:
    frames = _frames(8)
    field = _bad(kind, frames)
    ase.io.write(tmp_path / "bad.extxyz", frames)
    out = tmp_path / "s"
    before = None
    if append:
        ase.io.write(tmp_path / "good.extxyz", _frames(5, seed=2))
        before = ingest([str(tmp_path / "good.extxyz")], str(out), "good", E_MAP, F_MAP, shard_size=2,
                        progress=False)
    with pytest.raises(IngestError) as info:  # shard_size=2: shards are written before frame 3 fails
        ingest([str(tmp_path / "good.extxyz"), str(tmp_path / "bad.extxyz")] if append else
               [str(tmp_path / "bad.extxyz")], str(out), "bad", E_MAP, F_MAP, append=append, shard_size=2,
               progress=False)
    msg = str(info.value)
    assert "bad.extxyz" in msg and "frame 3" in msg and repr(field) in msg, msg
    if not append:
        assert not out.exists()
    else:
        after = Store.open(out)
        assert after.manifest == before.manifest and after.verify() == []
        assert sorted(p.name for p in (out / "shards").iterdir() if p.is_dir()) == [s.name for s in before.shards]


def test_bad_db_forces_shape(tmp_path: Path) -> None:
    with ase.db.connect(tmp_path / "a.db") as db:
        for i, a in enumerate(_frames(4)):
            n = len(a) + (1 if i == 2 else 0)
            db.write(a, key_value_pairs={"energy_lo": -1.0}, data={"forces_lo": np.zeros((n, 3))})
    with pytest.raises(IngestError, match=r"a\.db.*frame 2.*'forces_lo'.*shape"):
        ingest([str(tmp_path / "a.db")], str(tmp_path / "s"), "db", {"lo": "energy_lo"}, F_MAP, progress=False)
    assert not (tmp_path / "s").exists()


def test_bad_unit_and_empty_inputs(tmp_path: Path) -> None:
    ase.io.write(tmp_path / "a.extxyz", _frames(3))
    with pytest.raises(IngestError, match=r"a\.extxyz.*'energy_unit'.*furlong"):
        ingest([str(tmp_path / "a.extxyz")], str(tmp_path / "s"), "md", E_MAP, energy_unit="furlong/mol",
               progress=False)
    (tmp_path / "empty.extxyz").write_text("")
    with pytest.raises(IngestError, match=r"empty\.extxyz.*'frames'.*empty"):
        ingest([str(tmp_path / "empty.extxyz")], str(tmp_path / "s"), "md", E_MAP, progress=False)
    with pytest.raises(IngestError, match=r"a\.extxyz@10:20.*'frames'.*empty"):
        ingest([f"{tmp_path / 'a.extxyz'}@10:20"], str(tmp_path / "s"), "md", E_MAP, progress=False)
    with pytest.raises(IngestError, match=r"missing\.extxyz.*'path'"):
        ingest([str(tmp_path / "missing.extxyz")], str(tmp_path / "s"), "md", E_MAP, progress=False)
    assert not (tmp_path / "s").exists()


def test_ingest_demo_data_if_present(tmp_path: Path) -> None:
    from polyfid.data_shards.demo import HIGH, LOW, demo_files

    files = demo_files()
    if not files:
        pytest.skip("the demo data has not been generated yet")
    spec = f"{files[0]}@0:20"
    store = ingest([spec], str(tmp_path / "s"), "demo", {LOW: f"energy_{LOW}", HIGH: f"energy_{HIGH}"},
                   {LOW: f"forces_{LOW}", HIGH: f"forces_{HIGH}"}, ranks={HIGH: 1}, progress=False)
    frames = ase.io.read(spec)
    flat = _flat(store)
    assert [f.name for f in store.fidelities] == [LOW, HIGH] and set(store.elements) <= {1, 6, 7, 8}
    np.testing.assert_allclose(flat["energy"][:, 1], [a.info[f"energy_{HIGH}"] for a in frames])
    np.testing.assert_allclose(flat["forces"][:, 0], np.concatenate([a.arrays[f"forces_{LOW}"] for a in frames]),
                               rtol=1e-5, atol=1e-5)
