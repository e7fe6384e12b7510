"""Typed configs: YAML recipes, --set overrides, and errors that name the key and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from polyfid.distributed.config import ConfigError, RunConfig, load_config, resolve_tracking_uri, save_config

RECIPES = Path(__file__).resolve().parents[1] / "launch" / "recipes"


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_recipe_loads(recipe):
    cfg = load_config(RECIPES / recipe)
    assert isinstance(cfg, RunConfig)


def test_overrides_of_the_cli_contract():
    cfg = load_config(RECIPES / "demo.yaml", [
        "data.train=a.zarr,b.zarr", "data.valid=v.zarr", "trainer.workers=3", "trainer.steps=7",
        "model.kind=hipnn", "output=somewhere", "loss.fidelity_weights={hi: 2.0}",
    ])
    assert cfg.data.train == ["a.zarr", "b.zarr"] and cfg.data.valid == ["v.zarr"]
    assert (cfg.trainer.workers, cfg.trainer.steps, cfg.model.kind, cfg.output) == (3, 7, "hipnn", "somewhere")
    assert cfg.loss.fidelity_weights == {"hi": 2.0}


@pytest.mark.parametrize("override, words", [
    (["trainer.wrokers=2"], ["trainer.wrokers", "workers"]),
    (["trainer.mode=maml"], ["trainer.mode", "reptile", "multifidelity"]),
    (["trainer.zero_stage=3"], ["zero_stage", "0, 1, 2"]),
    (["trainer.steps=many"], ["trainer.steps", "integer"]),
    (["model.kind=transformer"], ["kind", "hipnn_ts"]),
    (["finetune.freeze=heads"], ["finetune.freeze", "backbone"]),
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
