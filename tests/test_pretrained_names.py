"""Named models: `pretrained:NAME` resolves wherever a package path is accepted, and `polyfid models` lists them."""

from __future__ import annotations

import json

import pytest
from ase.build import molecule

from polyfid.distributed.config import RunConfig
from polyfid.infra.resolve import resolve_package
from polyfid.launch.cli import main
from polyfid.models import Calculator, save_package
from polyfid.models.pretrained import ENV, UnknownModel, available, resolve_name
from polyfid.models.testing import tiny_potential

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def named(tmp_path, monkeypatch):
    """Two folders on POLYFID_MODELS: `mini` in both (the first wins) and `other` in the second."""
    first, second = tmp_path / "first", tmp_path / "second"
    save_package(first / "mini", tiny_potential("hipnn", seed=1))
    save_package(second / "mini", tiny_potential("hipnn", seed=2))
    save_package(second / "other", tiny_potential("hipnn_ts", seed=3))
    (first / "mini" / "MODEL_CARD.md").write_text("# mini\n")
    (second / "not-a-model").mkdir()
    monkeypatch.setenv(ENV, f"{first}:{second}")
    return first, second


def test_names_resolve_in_search_order_and_list_what_they_hold(named):
    first, second = named
    models = available()
    assert {"mini", "other"} <= set(models) and "not-a-model" not in models
    mini = models["mini"]
    assert mini.path == first / "mini" and mini.card == first / "mini" / "MODEL_CARD.md" and not mini.shipped
    assert models["other"].card is None
    ranks = {f["name"]: f["rank"] for f in json.loads((mini.path / "polyfid.json").read_text())["fidelities"]}
    assert len(mini.fidelities) == len(ranks) > 1
    assert [ranks[n] for n in mini.fidelities] == sorted(ranks.values())  # lowest rank first
    assert mini.size_bytes > 1000 and mini.cutoff > 0
    assert resolve_name("pretrained:mini") == str(first / "mini")
    assert resolve_package("pretrained:other", None) == str(second / "other")
    assert resolve_name("/some/path") == "/some/path"  # anything else passes through


def test_calculator_from_a_name_equals_the_calculator_from_the_path(named):
    first, _ = named
    atoms = molecule("CH3CH2OH")
    by_name = Calculator("pretrained:mini").get_potential_energy(atoms)
    by_path = Calculator(first / "mini").get_potential_energy(atoms)
    assert by_name == by_path
    assert by_name != Calculator("pretrained:other").get_potential_energy(atoms)


def test_an_unknown_name_lists_the_names_and_the_closest(named):
    with pytest.raises(UnknownModel, match=r"no model named 'mimi'.*available: .*mini.*did you mean pretrained:mini"):
        Calculator("pretrained:mimi")
    assert isinstance(UnknownModel("x"), FileNotFoundError)  # the CLI reports it as a clean error


def test_finetune_source_name_is_kept_as_given(named, tmp_path):
    cfg = RunConfig.from_dict({"finetune": {"source": "pretrained:mini"}, "output": str(tmp_path / "o")})
    cfg.resolve_paths()
    assert cfg.finetune.source == "pretrained:mini"


def test_cli_lists_the_models(named, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "pretrained:mini" in out and "pretrained:other" in out and "MODEL_CARD.md" in out
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["mini"]["path"].endswith("first/mini")


def test_cli_names_an_unknown_model_without_a_traceback(named, tmp_path, capsys):
    assert main(["export", "--to", "metatomic", "pretrained:nope", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert "no model named 'nope'" in err and "Traceback" not in err


def test_cli_shows_what_fine_tuning_gained_when_the_model_says(named, capsys):
    first, _ = named
    gain = {"level": "B3LYP/6-31G*", "gain": {"mol": {"100": {"force_ratio": 0.71}, "50": {"force_ratio": 0.52}}}}
    (first / "mini" / "FINETUNE.json").write_text(json.dumps(gain))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "pretrained:mini: fine-tuned / scratch test force MAE, B3LYP/6-31G*" in out
    assert "mol: 0.52x at 50, 0.71x at 100" in out  # by size, smallest first
    assert "pretrained:other:" not in out  # no FINETUNE.json, no line
    assert available()["mini"].finetune == gain
