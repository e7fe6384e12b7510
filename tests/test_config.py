"""Typed configs: YAML recipes, --set overrides, and errors that name the key and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from polyfid.distributed.config import ConfigError, RunConfig, load_config, save_config
from polyfid.infra.resolve import resolve_tracking_uri

RECIPES = Path(__file__).resolve().parents[1] / "launch" / "recipes"


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_recipe_loads(recipe):
    cfg = load_config(RECIPES / recipe)
    assert isinstance(cfg, RunConfig)


def test_overrides_of_the_cli_contract():
    cfg = load_config(RECIPES / "demo.yaml", [
        "data.train=a.zarr,b.zarr", "data.valid=v.zarr", "cluster.workers=3", "trainer.steps=7",
        "model.kind=hipnn", "output=somewhere", "loss.fidelity_weights={hi: 2.0}",
    ])
    assert cfg.data.train == ["a.zarr", "b.zarr"] and cfg.data.valid == ["v.zarr"]
    assert (cfg.cluster.workers, cfg.trainer.steps, cfg.model.kind, cfg.output) == (3, 7, "hipnn", "somewhere")
    assert cfg.loss.fidelity_weights == {"hi": 2.0}


@pytest.mark.parametrize("override, words", [
    (["trainer.wrokers=2"], ["trainer.wrokers", "cluster.workers"]),
    (["trainer.mode=maml"], ["trainer.mode", "reptile", "multifidelity"]),
    (["trainer.zero_stage=3"], ["zero_stage", "0, 1, 2"]),
    (["trainer.steps=many"], ["trainer.steps", "integer"]),
    (["model.kind=transformer"], ["kind", "hipnn_ts"]),
    (["finetune.freeze=heads"], ["finetune.freeze", "backbone"]),
    (["stopping.patience=-1"], ["stopping.patience", ">= 0"]),
    (["stopping.smoothing=1.5"], ["stopping.smoothing", "[0, 1)"]),
    (["stopping.min_steps=-5"], ["stopping.min_steps"]),
    (["stopping.keep_best=maybe"], ["stopping.keep_best", "true or false"]),
    (["stopping.pateince=3"], ["stopping.pateince", "patience"]),
    (["stopping.converged_fall=0"], ["stopping.converged_fall", "> 0"]),
    (["stopping.converged_window=1.0"], ["stopping.converged_window", "(0, 1)"]),
    (["trainer.energy_refit_every=-1"], ["trainer.energy_refit_every", ">= 0"]),
    (["trainer.energy_refit_structures=0"], ["trainer.energy_refit_structures"]),
    (["finetune.rescale_head=perhaps"], ["finetune.rescale_head", "true or false"]),
    (["finetune.scratch_lr=-1"], ["finetune.scratch_lr", "positive"]),
])
def test_errors_name_key_and_allowed_values(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(RECIPES / "demo.yaml", override)
    for w in words:
        assert w in str(e.value)


def test_round_trip_and_paths(tmp_path):
    cfg = load_config(RECIPES / "demo.yaml", ["data.train=rel.zarr", "tracking.uri=sqlite:///x.db"])
    cfg.resolve_paths(tmp_path)
    assert cfg.data.train == [str(tmp_path / "rel.zarr")]
    assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'x.db'}"
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").to_dict() == cfg.to_dict()
    assert resolve_tracking_uri("http://host:5000") == "http://host:5000"


def test_placement_keys_written_under_trainer_are_read_under_cluster(tmp_path):
    """Recipes, overrides and saved configs from before the split keep working: trainer.workers is cluster.workers."""
    old = tmp_path / "old.yaml"
    old.write_text("trainer:\n  workers: 3\n  use_gpu: false\n  steps: 5\ncluster:\n  placement: SPREAD\n")
    cfg = load_config(old, ["trainer.max_failures=2"])
    assert (cfg.cluster.workers, cfg.cluster.use_gpu, cfg.cluster.placement, cfg.cluster.max_failures) == (3, False, "SPREAD", 2)
    assert cfg.trainer.steps == 5 and "workers" not in cfg.to_dict()["trainer"]
    assert RunConfig.from_dict({"trainer": {"workers": 4}}).cluster.workers == 4
    with pytest.raises(ConfigError, match="did you mean cluster.workers"):
        load_config(None, ["trainer.wrokers=2"])


def test_early_stopping_keys_written_under_finetune_are_read_under_stopping(tmp_path, monkeypatch):
    """Recipes and overrides from before `stopping:` served every run keep working, with a warning."""
    import polyfid.distributed.config as config_module

    said: list[str] = []  # the module's own logger (other tests' CLI set-up may stop it from reaching caplog)
    monkeypatch.setattr(config_module.log, "warning", lambda msg, *args: said.append(msg % args))
    old = tmp_path / "old.yaml"
    old.write_text("finetune:\n  early_stopping_patience: 7\n  early_stopping_smoothing: 0.2\n")
    cfg = load_config(old, ["finetune.early_stopping_min_steps=50"])
    assert (cfg.stopping.patience, cfg.stopping.smoothing, cfg.stopping.min_steps) == (7, 0.2, 50)
    assert "early_stopping_patience" not in cfg.to_dict()["finetune"]
    assert any("is now stopping.patience" in m for m in said), said
    fine = load_config(RECIPES / "finetune.yaml")
    assert fine.stopping.patience > 0 and fine.trainer.energy_refit_every == fine.trainer.valid_every
    assert load_config(RECIPES / "demo.yaml").stopping.patience == 0  # pretraining never stops early by default
