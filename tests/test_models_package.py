"""The model package: round trip, atomic overwrite, clear errors, and no unpickling ever."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from ase.build import molecule

from polyfid import __version__
from polyfid.data_shards.schema import Fidelity
from polyfid.models import Calculator, graph_from_atoms, load_package, save_package
from polyfid.models.testing import implemented_kinds, tiny_potential


pytestmark = pytest.mark.usefixtures("one_thread")


def _energies(model):
    graph = graph_from_atoms([molecule("CH3CH2OH"), molecule("NH3")], model.config.cutoff, dtype=model.dtype)
    return model(graph, force_heads=list(range(len(model.fidelities))))


class _Planted:
    """Unpickling this creates a marker file: proof that something ran pickle.load."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", implemented_kinds())
def test_round_trip_is_exact(tmp_path, kind):
    model = tiny_potential(kind)
    model.set_reference_energies("low", {1: -13.6, 6: -1029.5, 7: -1485.0, 8: -2040.25})
    model.add_fidelity(Fidelity("tuned", rank=3, method="wB97X"), init_from="low")
    path = save_package(tmp_path / "pkg", model, lineage={"parent": None, "store": "abc123"}, extra={"note": "t"})
    loaded = load_package(path)
    a, b = _energies(model), _energies(loaded)
    assert torch.equal(a["energy"], b["energy"]) and torch.equal(a["forces"], b["forces"])
    assert loaded.fidelity_names == ["low", "high", "tuned"] and loaded.fidelities[2].rank == 3
    assert loaded.config == model.config and loaded.elements == model.elements
    meta = loaded.package_metadata
    assert meta["format"] == "polyfid-package" and meta["format_version"] == 1
    assert meta["polyfid_version"] == __version__ and meta["lineage"]["store"] == "abc123"
    assert meta["reference_energies"]["tuned"]["8"] == -2040.25 and meta["extra"] == {"note": "t"}
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "polyfid.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]  # no temporary folder left behind


def test_float32_package_stays_float32_and_calculator_loads_a_path(tmp_path):
    model = tiny_potential("hipnn_ts", dtype=torch.float32)
    path = save_package(tmp_path / "pkg", model)
    loaded = load_package(path)
    assert loaded.dtype == torch.float32
    assert torch.equal(_energies(model)["energy"], _energies(loaded)["energy"])
    atoms = molecule("H2O")
    atoms.calc = Calculator(str(path))
    assert atoms.calc.fidelity == "high"
    assert atoms.get_forces().shape == (3, 3)


def test_overwrite_replaces_and_refuses_foreign_folders(tmp_path):
    first, second = tiny_potential("hipnn", seed=1), tiny_potential("hipnn", seed=2)
    path = save_package(tmp_path / "pkg", first)
    save_package(path, second)
    assert torch.equal(_energies(load_package(path))["energy"], _energies(second)["energy"])
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a polyfid package"):
        save_package(foreign, first)
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_a_planted_pickle_is_never_executed(tmp_path):
    model = tiny_potential("hipnn_ts")
    path = save_package(tmp_path / "pkg", model)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Planted(str(marker)))
    for name in ("model.pt", "pytorch_model.bin", "model.pkl", "optimizer.pt", "data.pickle"):
        (path / name).write_bytes(payload)
    loaded = load_package(path)
    assert not marker.exists()
    assert torch.equal(_energies(loaded)["energy"], _energies(model)["energy"])
    pickle.loads(payload)  # the payload is live: unpickling it does create the marker
    assert marker.exists()


def test_missing_files_and_keys_are_named(tmp_path):
    path = save_package(tmp_path / "pkg", tiny_potential("hipnn"))
    meta = json.loads((path / "polyfid.json").read_text())
    del meta["fidelities"]
    (path / "polyfid.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"polyfid\.json lacks the key\(s\) \['fidelities'\]"):
        load_package(path)
    (path / "polyfid.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"polyfid\.json"):
        load_package(path)
    other = save_package(tmp_path / "other", tiny_potential("hipnn"))
    (other / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_package(other)


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    path = save_package(tmp_path / "pkg", tiny_potential("hipnn"))
    meta = json.loads((path / "polyfid.json").read_text())
    meta["config"]["width"] = 16
    (path / "polyfid.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"model\.safetensors does not match"):
        load_package(path)
