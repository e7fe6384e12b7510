"""The spine, end to end through the CLI on real parts: zarr stores on disk, Ray Train with 2 workers each
running a DeepSpeed engine (gloo), an MLflow sqlite store and registry, fine-tuning from a models:/ URI,
evaluation to JSON, and the ASE calculator on the result. Data: slices of the embedded QM demo files."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from polyfid.data_shards.demo import HIGH, LOW, demo_files
from polyfid.launch.cli import main

pytestmark = pytest.mark.timeout(900)


def _ingest(out, spec, forces, dataset="ethanol"):
    args = ["ingest", spec, "--out", str(out), "--dataset", dataset, "--quiet", "--shard-size", "8",
            "--energy", f"{LOW}=energy_{LOW}", "--energy", f"{HIGH}=energy_{HIGH}",
            "--rank", f"{LOW}=0", "--rank", f"{HIGH}=1"]
    for f in forces:
        args += ["--forces", f"{f}=forces_{f}"]
    assert main(args) == 0


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, shared_ray):
    """Ingest, pretrain on 2 Ray workers, fine-tune from the registry; shared by the tests below."""
    tmp = tmp_path_factory.mktemp("spine")
    files = {p.name.split(".")[0]: p for p in demo_files()}
    eth, fa, mam = files["ethanol"], files["formic_acid"], files["methylamine"]
    _ingest(tmp / "train.zarr", f"{eth}@:40", forces=[LOW])  # S1: high-level energies only
    _ingest(tmp / "train2.zarr", f"{mam}@:24", forces=[LOW], dataset="methylamine")  # a second store
    _ingest(tmp / "valid.zarr", f"{eth}@-10:", forces=[LOW, HIGH])
    _ingest(tmp / "target.zarr", f"{fa}@:16", forces=[HIGH], dataset="formic_acid")
    _ingest(tmp / "target_valid.zarr", f"{fa}@16:24", forces=[HIGH], dataset="formic_acid")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    common = ["--set", f"tracking.uri={uri}", "--set", "model.width=16", "--set", "model.n_sensitivities=8"]
    assert main(["pretrain", "--config", "launch/recipes/demo.yaml", "--set", f"data.train={tmp / 'train.zarr'},{tmp / 'train2.zarr'}",
                 "--set", f"data.valid={tmp / 'valid.zarr'}", "--set", "cluster.workers=2",
                 "--set", "trainer.steps=12", "--set", "trainer.log_every=4", "--set", "trainer.valid_every=6",
                 "--set", "trainer.checkpoint_every=6", "--set", f"output={tmp / 'pre'}",
                 "--set", "tracking.register_as=spine-test"] + common) == 0
    pre = json.loads((tmp / "pre" / "summary.json").read_text())
    assert main(["finetune", "--from", f"models:/spine-test/{pre['model_version']}", "--data", str(tmp / "target.zarr"),
                 "--valid", str(tmp / "target_valid.zarr"), "--replay", "0.25", "--patience", "2", "--compare-scratch",
                 "--out", str(tmp / "ft" / "package"), "--set", "trainer.steps=6", "--set", "trainer.valid_every=2",
                 "--set", f"trainer.trace_dir={tmp / 'ft_trace'}"] + common) == 0
    ft = json.loads((tmp / "ft" / "summary.json").read_text())
    return {"tmp": tmp, "uri": uri, "pre": pre, "ft": ft}


def test_pretrain_writes_package_and_mlflow_run(pipeline):
    from mlflow.tracking import MlflowClient

    tmp, pre = pipeline["tmp"], pipeline["pre"]
    meta = json.loads((tmp / "pre" / "package" / "polyfid.json").read_text())
    assert [f["name"] for f in meta["fidelities"]] == [LOW, HIGH]
    assert meta["lineage"]["mlflow_run_id"] == pre["mlflow_run_id"]
    assert len(meta["lineage"]["stores"]) == 2 and all(s["fingerprint"] for s in meta["lineage"]["stores"])
    assert meta["elements"] == [1, 6, 7, 8]  # the union over both stores
    assert (tmp / "pre" / "config.yaml").exists()
    assert sorted(p.name for p in (tmp / "pre" / "checkpoints").glob("step_*")) == ["step_00000006", "step_00000012"]

    client = MlflowClient(pipeline["uri"])
    run = client.get_run(pre["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["cluster.workers"] == "2"
    for key in (f"loss/{LOW}", f"loss/{HIGH}", f"valid/energy_mae/{HIGH}", f"valid/forces_mae/{HIGH}",
                "atoms_per_s", "atoms_per_s/worker0", "atoms_per_s/worker1", "data_wait_fraction", "lr",
                "step_time_s", "atom_budget_fill", "comm_time_fraction", "comm_mb_per_step"):
        assert key in run.data.metrics, key
        assert math.isfinite(run.data.metrics[key])
    history = client.get_metric_history(pre["mlflow_run_id"], "loss")
    assert [m.step for m in history] == [4, 8, 12]
    # whether the run converged (stopping.converged_fall over the last 20% of its steps): summary, tag and metric
    conv = pre["best"]["convergence"]
    assert conv["last_step"] == 12 and conv["fall"] >= 0 and isinstance(conv["converged"], bool)
    assert run.data.tags["converged"] == str(conv["converged"]).lower()
    assert run.data.metrics["converged"] == float(conv["converged"])
    assert run.data.metrics["valid_forces_fall_last"] == pytest.approx(conv["fall"])
    assert run.data.metrics["comm_mb_per_step"] > 0 and 0 < run.data.metrics["atom_budget_fill"] <= 1
    artifacts = {a.path for a in client.list_artifacts(pre["mlflow_run_id"], "package")}
    assert {"package/model.safetensors", "package/polyfid.json"} <= artifacts
    versions = client.search_model_versions("name='spine-test'")
    assert [v.run_id for v in versions] == [pre["mlflow_run_id"]]
    # no model card beside a training run's package: the registry describes it from its metadata
    desc = client.get_registered_model("spine-test").description
    assert desc == versions[0].description and f"{LOW} (rank" in desc and "Elements: 1, 6, 7, 8" in desc
    assert pre["mlflow_run_id"] in desc


def test_finetune_records_parent_and_registers(pipeline):
    from mlflow.tracking import MlflowClient

    tmp, pre, ft = pipeline["tmp"], pipeline["pre"], pipeline["ft"]
    meta = json.loads((tmp / "ft" / "package" / "polyfid.json").read_text())
    assert meta["lineage"]["parent"].startswith("models:/spine-test/")
    assert meta["lineage"]["parent_lineage"]["mlflow_run_id"] == pre["mlflow_run_id"]
    client = MlflowClient(pipeline["uri"])
    run = client.get_run(ft["mlflow_run_id"])
    assert run.data.tags["polyfid.parent"] == meta["lineage"]["parent"]
    # the dashboard links (and nests) the fine-tuning run under the pretraining run
    assert run.data.tags["polyfid.parent_run_id"] == pre["mlflow_run_id"]
    assert run.data.tags["mlflow.parentRunId"] == pre["mlflow_run_id"]
    assert ft["model_version"] is not None
    assert [v.run_id for v in client.search_model_versions("name='polyfid-finetuned'")] == [ft["mlflow_run_id"]]


def test_finetune_step0_replay_forgetting_scratch(pipeline):
    from mlflow.tracking import MlflowClient

    tmp, ft = pipeline["tmp"], pipeline["ft"]
    meta = json.loads((tmp / "ft" / "package" / "polyfid.json").read_text())
    # replay came from the parent's lineage: the two pretraining stores
    assert meta["lineage"]["replay"]["fraction"] == 0.25
    # recorded as paths relative to the working directory, never absolute (data_shards/named.py)
    assert sorted(meta["lineage"]["replay"]["stores"]) == sorted(os.path.relpath(tmp / n) for n in ("train.zarr",
                                                                                                  "train2.zarr"))
    assert f'"{tmp}' not in (tmp / "ft" / "package" / "polyfid.json").read_text()  # no JSON string is an absolute path
    steps = [json.loads(line) for line in (tmp / "ft_trace" / "rank0.jsonl").read_text().splitlines()]
    assert len(steps) >= 2
    for rec in steps:  # every batch mixes target structures (store 0) and replayed ones (stores 1, 2)
        stores = {s for s, _ in rec["ids"]}
        assert 0 in stores and stores & {1, 2}, rec
    # the step-0 error (after the reference refit) is reported and logged at step 0
    assert 0 < ft["step0_validation"][HIGH]["forces_mae"] < 50
    history = MlflowClient(pipeline["uri"]).get_metric_history(ft["mlflow_run_id"], f"valid/forces_mae/{HIGH}")
    assert history[0].step == 0 and history[-1].step > 0
    assert 0 <= ft["best"]["best_step"] <= ft["best"]["last_step"] <= 6
    # forgetting: parent vs fine-tuned on the parent's data, for both old heads
    assert set(ft["forgetting"]) == {LOW, HIGH}
    for fid in (LOW, HIGH):
        r = ft["forgetting"][fid]
        assert math.isclose(r["energy_mae_finetuned"] - r["energy_mae_parent"], r["energy_mae_increase"], abs_tol=1e-9)
    # --compare-scratch trained the same budget from a random init and evaluated both on --valid
    cmp = json.loads((tmp / "ft" / "compare_scratch.json").read_text())
    assert set(cmp["errors"]) == {"fine-tuned", "from scratch"}
    assert cmp["errors"]["from scratch"][HIGH]["n_structures"] == 8
    scratch_meta = json.loads((tmp / "ft" / "scratch" / "package" / "polyfid.json").read_text())
    assert scratch_meta["lineage"]["parent"] is None and scratch_meta["config"] == meta["config"]
    # parity plots and the learning curve went to the run
    arts = {a.path for a in MlflowClient(pipeline["uri"]).list_artifacts(ft["mlflow_run_id"], "plots")}
    assert any(p.endswith(".png") for p in arts), arts


def test_evaluate_json_and_calculator(pipeline, tmp_path):
    import ase.io
    import polyfid

    tmp = pipeline["tmp"]
    out = tmp_path / "errors.json"
    assert main(["evaluate", "--model", str(tmp / "pre" / "package"), "--data", str(tmp / "valid.zarr"),
                 "--json", str(out), "--quiet"]) == 0
    res = json.loads(out.read_text())
    assert set(res) == {LOW, HIGH}
    for fid in (LOW, HIGH):
        assert set(res[fid]) >= {"energy_mae", "energy_rmse", "forces_mae", "forces_rmse", "n_structures"}
        assert res[fid]["n_structures"] == 10
        assert 0 < res[fid]["energy_mae"] <= res[fid]["energy_rmse"]
    atoms = ase.io.read(str([p for p in demo_files() if p.name.startswith("ethanol")][0]), index=0)
    atoms.calc = polyfid.Calculator(tmp / "ft" / "package")
    assert atoms.calc.fidelity == HIGH  # default: highest rank
    e, f = atoms.get_potential_energy(), atoms.get_forces()
    assert np.isfinite(e) and f.shape == (len(atoms), 3)

