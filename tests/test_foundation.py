"""The foundation builder on slices of the committed corpus: stores, real Ray + DeepSpeed pretraining, errors per
level on test and held-out molecules, a model card, and shipping under a name that `pretrained:` resolves."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import ase.io
import pytest
import yaml
from ase.build import molecule

from polyfid.data_shards.corpus.stores import FILES
from polyfid.launch.foundation import corpus_stores, main
from polyfid.models import Calculator
from polyfid.models.pretrained import ENV, available

SLICES = {("gfn2_xtb", "train"): 24, ("gfn2_xtb", "valid"): 6, ("gfn2_xtb", "test"): 8, ("gfn2_xtb", "heldout"): 8,
          ("hf_631g", "train"): 16, ("hf_631g", "test"): 6, ("hf_631g", "heldout"): 6}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """A few frames of some committed corpus files (real GFN2-xTB and HF/6-31G labels): one frame each of molecules
    spread over the file (it is in molecule-list order, alkanes first), so that the training slices hold H, C, N
    and O like the held-out ones."""
    files = tmp_path_factory.mktemp("corpus_files")
    for (level, split), n in SLICES.items():
        plain = files / f"{level}_{split}.extxyz"  # ASE seeks in what it reads: gzip would re-inflate each time
        with gzip.open(FILES / f"{level}_{split}.extxyz.gz", "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
        first: dict[str, object] = {}
        for atoms in ase.io.iread(plain, format="extxyz"):
            first.setdefault(atoms.info["molecule"], atoms)
        pool = list(first.values())
        frames = [pool[round(i * (len(pool) - 1) / max(n - 1, 1))] for i in range(min(n, len(pool)))]
        if split == "train":
            assert {1, 6, 7, 8} <= {int(z) for a in frames for z in a.numbers}, level
        plain.unlink()
        ase.io.write(files / f"{level}_{split}.extxyz.gz", frames, format="extxyz")
    return files


def test_stores_are_found_by_level_and_split(small_corpus, tmp_path):
    stores = corpus_stores(tmp_path / "stores", small_corpus)
    assert set(stores) == {"gfn2_xtb", "hf_631g"}
    assert set(stores["hf_631g"]) == {"train", "test", "heldout"}
    with pytest.raises(FileNotFoundError, match="no corpus stores"):
        corpus_stores(tmp_path / "empty", tmp_path / "no_files")


def test_only_missing_or_outdated_stores_are_made_again(small_corpus, tmp_path):
    import os

    from polyfid.data_shards.corpus.stores import make_stores

    made = make_stores(tmp_path / "stores", small_corpus, stale_only=True)
    assert len(made) == len(SLICES)
    assert make_stores(tmp_path / "stores", small_corpus, stale_only=True) == []
    newer = small_corpus / "hf_631g_test.extxyz.gz"  # a re-exported file (the corpus grew)
    later = (tmp_path / "stores" / "hf_631g_test.zarr" / "zarr.json").stat().st_mtime + 5
    os.utime(newer, (later, later))
    assert make_stores(tmp_path / "stores", small_corpus, stale_only=True) == [tmp_path / "stores" / "hf_631g_test.zarr"]
    # without a files folder, the one the stores came from is used, not the committed corpus
    assert set(corpus_stores(tmp_path / "stores")) == {"gfn2_xtb", "hf_631g"}


def test_build_measure_card_and_ship(small_corpus, tmp_path, monkeypatch, capsys):
    stores = tmp_path / "stores"
    corpus_stores(stores, small_corpus)
    shelf = tmp_path / "shelf"
    monkeypatch.setenv(ENV, str(shelf))
    code = main(["--stores", str(stores), "--out", str(tmp_path / "run"), "--name", "test-mini", "--ship",
                 "--ship-to", str(shelf), "--set", "trainer.steps=6", "--set", "trainer.valid_every=3",
                 "--set", "trainer.checkpoint_every=3", "--set", "model.width=16", "--set", "model.n_sensitivities=8",
                 "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "--set", "tracking.register_as=null"])
    assert code == 0
    # the recipe's data.oversample=top: the highest level's store gets a quarter of each batch if it holds less
    from polyfid.data_shards.store import Store

    ran = yaml.safe_load((tmp_path / "run" / "pretrain" / "config.yaml").read_text())["data"]
    atoms = {p: Store.open(p).n_atoms for p in ran["train"]}
    top = [p for p in ran["train"] if "hf_631g" in p]
    assert ran["oversample"] == (top if sum(atoms[p] for p in top) < 0.25 * sum(atoms.values()) else [])
    errors = json.loads((tmp_path / "run" / "errors.json").read_text())
    assert set(errors) == {"gfn2_xtb", "hf_631g"}
    assert errors["gfn2_xtb"]["heldout"]["n_structures"] == 8 and errors["hf_631g"]["test"]["n_structures"] == 6
    assert all(r["forces_mae"] > 0 for by in errors.values() for r in by.values())

    card = (shelf / "test-mini" / "MODEL_CARD.md").read_text()
    assert "`pretrained:test-mini`" in card and "Elements: H, C, N, O" in card and "fidelity=\"hf_631g\")`" in card
    assert "| `hf_631g` | heldout | 6 |" in card and "| `gfn2_xtb` (rank 1) | GFN2-xTB / - | tblite | 24 | 6 | 8 | 8 |" in card
    assert "python -m polyfid.launch.foundation --stores" in card and "Known limits" in card
    best = json.loads((tmp_path / "run" / "pretrain" / "best.json").read_text())  # validated at 3 and 6
    assert f"Stopping: {best['stop_reason']}; the package holds the best weights" in card
    assert ("Convergence, by the validation force MAE: " + ("converged: " if best["convergence"]["converged"]
                                                             else "NOT converged: ")) in card
    hf_test = errors["hf_631g"]["test"]["forces_mae"] * 1e3
    assert f"{hf_test:.1f}" in card  # the card prints the measured figure
    for fig in ("parity_gfn2_xtb", "parity_hf_631g", "learning_curve"):  # drawn, shipped and shown in the card
        assert (shelf / "test-mini" / "figures" / f"{fig}.png").stat().st_size > 1000
        assert f"![{fig}](figures/{fig}.png)" in card

    named = available()["test-mini"]
    assert named.card is not None and set(named.fidelities) == {"gfn2_xtb", "hf_631g"}
    e = Calculator("pretrained:test-mini", fidelity="hf_631g").get_potential_energy(molecule("CH3OH"))
    assert e == pytest.approx(Calculator(tmp_path / "run" / "pretrain" / "package", fidelity="hf_631g")
                              .get_potential_energy(molecule("CH3OH")))

    # the name works as a fine-tuning source too, and the lineage keeps the name the user gave
    from polyfid.launch.cli import main as cli

    ft = tmp_path / "ft"
    assert cli(["finetune", "--from", "pretrained:test-mini", "--data", str(stores / "hf_631g_train.zarr"),
                "--valid", str(stores / "hf_631g_test.zarr"), "--out", str(ft / "package"),
                "--set", "trainer.steps=2", "--set", "cluster.workers=1", "--set", f"tracking.uri=sqlite:///{ft / 'm.db'}",
                "--set", "tracking.register_as=null"]) == 0
    assert json.loads((ft / "package" / "polyfid.json").read_text())["lineage"]["parent"] == "pretrained:test-mini"
