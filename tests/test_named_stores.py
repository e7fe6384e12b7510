"""Stores named portably (`corpus:NAME`), and packages and cards that record no absolute path.

The corpus stores are built from the committed files into a cache under tmp_path, as on a machine that never
saw the run that made the shipped model."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from polyfid.data_shards.named import corpus_name_of, corpus_names, open_store, portable_ref, resolve_store
from polyfid.distributed.modes.replay import replay_refs
from polyfid.models.package import read_metadata, resolve_name

ABSOLUTE = re.compile(r"(?<![\w.:/])/(?:work|tmp|home|root|Users|var|opt|mnt|data|scratch)/")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYFID_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_corpus_name_is_built_once_into_the_cache_with_the_shipped_fingerprint(cache):
    store = open_store("corpus:wb97x_631gs_valid")
    assert Path(store.path).parent == cache / "stores" / "corpus"
    assert store.n_structures == 102 and [f.name for f in store.fidelities] == ["wb97x_631gs"]
    done = Path(store.path) / "zarr.json"
    stamp = done.stat().st_mtime_ns
    assert Path(resolve_store("corpus:wb97x_631gs_valid")) == Path(store.path) and done.stat().st_mtime_ns == stamp
    assert corpus_name_of(store.path) == "corpus:wb97x_631gs_valid"
    assert portable_ref(store.path) == "corpus:wb97x_631gs_valid"
    # the shipped model's lineage names its data by these names, and the rebuilt store is the one it saw
    meta = read_metadata(resolve_name("pretrained:organic-mini"))
    recorded = {e["path"]: e["fingerprint"] for e in meta["lineage"]["valid_stores"]}
    assert recorded["corpus:wb97x_631gs_valid"] == store.fingerprint


def test_an_unknown_corpus_name_lists_the_known_ones(cache):
    with pytest.raises(FileNotFoundError, match="known names: .*corpus:gfn2_xtb_train"):
        open_store("corpus:gfn3_xtb_train")
    assert "corpus:hf_631g_valid" in corpus_names()


def test_portable_refs_are_never_absolute(tmp_path):
    inside = Path.cwd() / "runs" / "x.zarr"
    assert portable_ref(str(inside)) == os.path.join("runs", "x.zarr")
    assert not os.path.isabs(portable_ref(str(tmp_path / "y.zarr")))
    assert portable_ref("s3://bucket/z.zarr") == "s3://bucket/z.zarr"
    assert portable_ref("models:/m/3") == "models:/m/3" and portable_ref("pretrained:organic-mini") == "pretrained:organic-mini"
    assert portable_ref(f"sqlite:///{inside.parent / 'mlflow.db'}") == "sqlite:///runs/mlflow.db"
    assert portable_ref(None) is None


def test_the_shipped_packages_and_cards_name_no_absolute_path():
    root = Path(__file__).resolve().parents[1] / "models" / "pretrained"
    files = [p for p in root.rglob("*") if p.suffix in (".json", ".md")]
    assert any(p.name == "polyfid.json" for p in files)
    for p in files:
        hits = ABSOLUTE.findall(p.read_text())
        assert not hits, f"{p} names absolute paths: {hits[:3]}"
    meta = json.loads((root / "organic-mini" / "polyfid.json").read_text())
    assert all(e["path"].startswith("corpus:") for e in meta["lineage"]["stores"] + meta["lineage"]["valid_stores"])


def test_replay_of_missing_data_says_how_to_get_it_and_how_to_skip_it(cache, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        replay_refs([str(tmp_path / "gone.zarr")])
    assert "gone.zarr" in str(err.value) and "--replay 0" in str(err.value) and "--replay-stores" in str(err.value)
    assert replay_refs(["corpus:wb97x_631gs_valid"]) == ["corpus:wb97x_631gs_valid"]  # names stay names
