"""Label outliers at ingest: a +20 eV frame planted in real demo data (QM labels) is flagged and named."""

from __future__ import annotations

import logging
from pathlib import Path

import ase.io
import numpy as np
import pytest

from polyfid.data_shards.demo import HIGH, LOW, demo_files
from polyfid.data_shards.ingest import ingest
from polyfid.data_shards.inspect import format_summary, summarize
from polyfid.data_shards.sources import IngestError
from polyfid.data_shards.store import Store

PLANTED = 37  # in the last, partial shard (shard_size 16)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> str:
    """40 ethanol frames with their real labels, frame 7's low-level energy 20 eV off (a failed SCF)."""
    src = [p for p in demo_files() if p.name.startswith("ethanol")][0]
    frames = ase.io.read(src, index=":40")
    frames[PLANTED].info[f"energy_{LOW}"] += 20.0
    out = tmp_path_factory.mktemp("outliers") / "ethanol_planted.extxyz"
    ase.io.write(out, frames, format="extxyz")
    return str(out)


def _ingest(src: str, out, policy: str):
    return ingest([src], str(out), dataset="ethanol", energy={LOW: f"energy_{LOW}", HIGH: f"energy_{HIGH}"},
                  forces={LOW: f"forces_{LOW}"}, ranks={LOW: 0, HIGH: 1}, shard_size=16, progress=False,
                  outliers=policy)


def _row(store: Store, sid: int) -> tuple[dict, int]:
    for k in range(len(store.shards)):
        shard = store.read_shard(k)
        if sid in shard["structure_id"]:
            return shard, list(shard["structure_id"]).index(sid)
    raise KeyError(sid)


def test_planted_frame_is_flagged_and_named(planted, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="polyfid.ingest"):
        store = _ingest(planted, tmp_path / "warn.zarr", "warn")
    assert f"{planted}@{PLANTED}" in caplog.text and "1 label outlier" in caplog.text
    flagged = store.manifest["provenance"][-1]["outliers"]["flagged"]
    assert [(o["structure_id"], o["fidelity"], o["kind"]) for o in flagged] == [(PLANTED, LOW, "energy")]
    assert flagged[0]["value"] == pytest.approx(20.0 / 9, rel=0.05)  # ethanol has 9 atoms
    assert "label outliers: 1" in format_summary(summarize(store))
    shard, row = _row(store, PLANTED)
    assert np.isfinite(shard["energy"][LOW][row])  # warn keeps the label


def test_clean_data_has_no_outliers(tmp_path, caplog):
    src = [p for p in demo_files() if p.name.startswith("ethanol")][0]
    with caplog.at_level(logging.WARNING, logger="polyfid.ingest"):
        store = _ingest(f"{src}@:40", tmp_path / "clean.zarr", "error")
    assert store.manifest["provenance"][-1]["outliers"]["n"] == 0 and "outlier" not in caplog.text


def test_drop_masks_the_label_and_leaves_it_out_of_the_references(planted, tmp_path):
    dropped = _ingest(planted, tmp_path / "drop.zarr", "drop")
    assert dropped.manifest["masked_labels"] == {LOW: {"energy": [PLANTED]}}
    shard, row = _row(dropped, PLANTED)
    assert np.isnan(shard["energy"][LOW][row]) and np.isfinite(shard["energy"][HIGH][row])
    assert np.isfinite(shard["forces"][LOW]).all()  # only the flagged label goes
    src = [p for p in demo_files() if p.name.startswith("ethanol")][0]
    clean = _ingest(f"{src}@:40", tmp_path / "clean.zarr", "warn")
    kept = _ingest(planted, tmp_path / "kept.zarr", "warn")
    e_drop, e_clean, e_kept = (s.manifest["reference_sums"][LOW] for s in (dropped, clean, kept))
    assert e_drop["n"] == e_clean["n"] - 1
    shift = lambda s: s.reference_energies[LOW]  # noqa: E731
    assert max(abs(shift(dropped)[z] - shift(clean)[z]) for z in shift(clean)) < max(
        abs(shift(kept)[z] - shift(clean)[z]) for z in shift(clean))


def test_error_refuses_the_ingest_naming_file_frame_and_field(planted, tmp_path):
    with pytest.raises(IngestError) as e:
        _ingest(planted, tmp_path / "err.zarr", "error")
    assert (e.value.file, e.value.index, e.value.field) == (planted, PLANTED, f"energy/{LOW}")
    assert not (tmp_path / "err.zarr").exists()  # nothing written
    with pytest.raises(IngestError, match="outliers must be one of"):
        _ingest(planted, tmp_path / "bad.zarr", "ignore")


def test_a_force_above_the_cap_is_flagged(tmp_path):
    from polyfid.data_shards.outliers import OutlierCheck

    src = [p for p in demo_files() if p.name.startswith("ethanol")][0]
    frames = ase.io.read(src, index=":20")
    frames[3].arrays[f"forces_{LOW}"][0] = [150.0, 0.0, 0.0]
    path = tmp_path / "f.extxyz"
    ase.io.write(path, frames, format="extxyz")
    store = _ingest(str(path), tmp_path / "f.zarr", OutlierCheck("drop", force_cap=100.0))
    assert store.manifest["masked_labels"] == {LOW: {"forces": [3]}}
    shard = store.read_shard(0)
    off = shard["offsets"]
    assert np.isnan(shard["forces"][LOW][off[3]:off[4]]).all() and np.isfinite(shard["forces"][LOW][:off[3]]).all()


def test_strained_geometries_of_the_corpus_are_not_taken_for_bad_labels(tmp_path):
    """The corpus's rattled and compressed geometries (real HF/6-31G labels) lie eV per atom above the median
    on purpose; their forces say why, so they are not flagged. A +20 eV label on an MD frame still is."""
    from polyfid.data_shards.outliers import OutlierCheck

    src = Path(__file__).resolve().parents[1] / "data_shards" / "corpus" / "extxyz" / "hf_631g_train.extxyz.gz"
    frames = ase.io.read(src, index=":400")
    strained = [i for i, a in enumerate(frames) if a.info["sampler"] in ("rattle", "compress", "compress_bond")]
    target = next(i for i, a in enumerate(frames) if a.info["sampler"] == "md300K")
    frames[target].info["energy_hf_631g"] += 20.0
    path = tmp_path / "hf.extxyz"
    ase.io.write(path, frames, format="extxyz")

    def run(name, check):
        store = ingest([str(path)], str(tmp_path / name), dataset="hf", energy={"hf": "energy_hf_631g"},
                       forces={"hf": "forces_hf_631g"}, progress=False, outliers=check)
        return [(o["structure_id"], o["kind"]) for o in store.manifest["provenance"][-1]["outliers"]["flagged"]]

    assert strained and run("default.zarr", OutlierCheck("warn")) == [(target, "energy")]
    naive = run("naive.zarr", OutlierCheck("warn", k_strain=float("inf")))  # without the strain rule
    assert (target, "energy") in naive and len({i for i, _ in naive} & set(strained)) > 0
