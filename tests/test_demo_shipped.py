"""The demo's shipped-checkpoint path: `polyfid register` puts pretrained:NAME into a real MLflow sqlite registry,
and `run_demo` fine-tunes it from there beside its own pretraining (real Ray + DeepSpeed, tiny step counts)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from polyfid.data_shards.schema import Fidelity
from polyfid.distributed.finetune.plan import _init_head
from polyfid.infra.resolve import resolve_package
from polyfid.infra.tracking import registry_description
from polyfid.launch.cli import main
from polyfid.models import load_package, save_package
from polyfid.models.pretrained import ENV
from polyfid.models.testing import tiny_potential

LEVELS = (Fidelity("gfn2_xtb", rank=1, method="GFN2-xTB"), Fidelity("gfn1_xtb", rank=0, method="GFN1-xTB"),
          Fidelity("wb97x_631gs", rank=3, method="wB97X", basis="6-31G*"))


@pytest.fixture()
def shelf(tmp_path, monkeypatch):
    """A shelf on POLYFID_MODELS with `demo-mini`: a small model with the corpus's elements and three levels."""
    root = tmp_path / "shelf"
    model = tiny_potential("hipnn_ts", seed=4, dtype=__import__("torch").float32, elements=(1, 6, 7, 8),
                           fidelities=LEVELS, width=16, cutoff=5.0, soft_max=4.5)
    save_package(root / "demo-mini", model)
    (root / "demo-mini" / "MODEL_CARD.md").write_text("# demo-mini\n")
    monkeypatch.setenv(ENV, str(root))
    return root


def test_register_cli_puts_a_named_model_in_the_registry_with_its_card(shelf, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'reg.db'}"
    assert main(["register", "pretrained:demo-mini", "--tracking-uri", uri]) == 0
    assert "models:/polyfid-demo-mini/1" in capsys.readouterr().out
    assert main(["register", "pretrained:demo-mini", "--tracking-uri", uri, "--name", "mine"]) == 0
    assert main(["register", "pretrained:demo-mini", "--tracking-uri", uri]) == 0
    assert "models:/polyfid-demo-mini/2" in capsys.readouterr().out
    local = resolve_package("models:/polyfid-demo-mini/2", uri, tmp_path / "dl")
    assert (tmp_path / "dl").exists() and (shelf / "demo-mini" / "MODEL_CARD.md").read_text() in \
        open(f"{local}/MODEL_CARD.md").read()
    assert [f.name for f in load_package(local).fidelities] == [f.name for f in LEVELS]
    # a user browsing the registry sees the model card: on the registered model and on each version
    from mlflow.tracking import MlflowClient

    card = (shelf / "demo-mini" / "MODEL_CARD.md").read_text()
    client = MlflowClient(uri)
    assert client.get_registered_model("polyfid-demo-mini").description == card[:5000]
    assert client.get_model_version("polyfid-demo-mini", "2").description == card[:5000]
    (shelf / "demo-mini" / "MODEL_CARD.md").write_text("x" * 6000)  # longer than the registry keeps: cut, said so
    desc = registry_description(shelf / "demo-mini")
    assert len(desc) == 5000 and desc.startswith("x" * 4000) and "MODEL_CARD.md artifact" in desc
    latest = resolve_package("models:/polyfid-demo-mini/latest", uri, tmp_path / "dl2")
    assert (tmp_path / "dl2").exists() and open(f"{latest}/polyfid.json").read() == open(f"{local}/polyfid.json").read()
    with pytest.raises(Exception, match="mine"):
        resolve_package("models:/mine/7", uri, tmp_path / "dl3")
    capsys.readouterr()
    assert main(["register", "pretrained:demo-mni", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "demo-mni" in err and "did you mean pretrained:demo-mini" in err


def test_a_new_head_starts_from_the_head_asked_for():
    parent = tiny_potential("hipnn", fidelities=LEVELS, elements=(1, 6, 8))
    new = Fidelity("b3lyp_631gs", rank=1)
    assert _init_head(parent, new, None) == "gfn2_xtb"  # closest by rank
    assert _init_head(parent, new, "wb97x_631gs") == "wb97x_631gs"
    assert _init_head(parent, None, "wb97x_631gs") is None  # an existing head: nothing to start from
    with pytest.raises(ValueError, match="init_from='ccsd' is not a head of the parent .*gfn2_xtb"):
        _init_head(parent, new, "ccsd")


def meta_config(tmp_path):
    """The architecture of the shipped-model fine-tuning's package (the scratch run uses the same)."""
    return json.loads((tmp_path / "demo" / "finetune_demo-mini" / "package" / "polyfid.json").read_text())["config"]


def test_demo_fine_tunes_the_shipped_checkpoint_from_the_registry(shelf, tmp_path, monkeypatch, capsys):
    from polyfid.launch.demo import HIGH, run_demo

    monkeypatch.chdir(tmp_path)  # the demo recipe's sqlite:///mlflow.db lands here
    sets = ["trainer.steps=4", "trainer.valid_every=2", "trainer.checkpoint_every=4", "trainer.log_every=2",
            "model.width=16", "model.n_sensitivities=8"]
    out = run_demo(tmp_path / "demo", steps=4, workers=2, overrides=sets, shipped="demo-mini")
    printed = capsys.readouterr().out
    assert "registered pretrained:demo-mini as models:/polyfid-demo-mini/1" in printed
    rows = out["finetune_compare"]
    assert len(rows) == 3 and "`pretrained:demo-mini` (shipped)" in rows
    assert "nothing: from scratch (demo-mini's architecture)" in rows  # the same target from a random init
    for res in rows.values():  # 100 frames: 50 train, 20 valid, 30 test
        assert res[HIGH]["n_structures"] == 30 and all(math.isfinite(res[HIGH][k]) for k in ("energy_mae", "forces_mae"))
    scratch = json.loads((tmp_path / "demo" / "scratch" / "package" / "polyfid.json").read_text())
    assert scratch["lineage"]["parent"] is None and scratch["config"] == meta_config(tmp_path)
    assert (tmp_path / "demo" / "scratch" / "best.json").exists()  # best weights kept, as in the fine-tunings
    assert "| `pretrained:demo-mini` (shipped) |" in printed
    cfg = yaml.safe_load((tmp_path / "demo" / "finetune_demo-mini" / "config.yaml").read_text())
    assert cfg["finetune"]["source"] == "models:/polyfid-demo-mini/1" and cfg["finetune"]["init_from"] == "wb97x_631gs"
    meta = json.loads((tmp_path / "demo" / "finetune_demo-mini" / "package" / "polyfid.json").read_text())
    assert meta["lineage"]["parent"] == "models:/polyfid-demo-mini/1"
    assert {f["name"] for f in meta["fidelities"]} == {f.name for f in LEVELS} | {HIGH}
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["finetune_compare"] == json.loads(
        json.dumps(rows))
    # no S1 by default; and a shelf without the model skips the step with a note, it does not fail
    assert "s1" not in out and "S1:" not in printed
