"""`polyfid demo`: the whole path on the embedded QM data, in one command.

ingest -> multi-fidelity pretraining (Ray Train, 2 DeepSpeed workers) -> MLflow + registry -> fine-tune from
the registry -> evaluate -> a table of errors per fidelity.

The pretraining data follow S1: low-level (GFN2-xTB) energies and forces, high-level (B3LYP/6-31G*)
energies only. Validation frames carry forces at both levels, so the table shows how well high-level
forces are learned without any high-level force label. The fine-tuning target is a molecule the
pretraining never saw (formic acid), with 50 high-level frames.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from polyfid.data_shards.demo import HIGH, LOW, demo_files

RECIPES = Path(__file__).parent / "recipes"
TARGET = "formic_acid"
N_VALID = 20  # last frames of each pretraining molecule
N_TARGET_TRAIN = 50


def _section(title: str) -> float:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)
    return time.perf_counter()


def ingest_demo(workdir: Path) -> dict[str, str]:
    """Write the four demo stores; returns their paths."""
    from polyfid.data_shards.ingest import ingest

    files = {p.name.split(".")[0]: p for p in demo_files()}
    if TARGET not in files or len(files) < 2:
        raise FileNotFoundError(f"the embedded demo data is incomplete: found {sorted(files)}")
    stores = {k: str(workdir / "stores" / f"{k}.zarr") for k in ("pretrain", "valid", "target", "target_test")}
    energy = {LOW: f"energy_{LOW}", HIGH: f"energy_{HIGH}"}
    ranks = {LOW: 0, HIGH: 1}
    meta = {LOW: {"method": "GFN2-xTB", "code": "tblite"},
            HIGH: {"method": "B3LYP", "basis": "6-31G*", "code": "PySCF"}}
    pretrain = [n for n in sorted(files) if n != TARGET]
    for i, name in enumerate(pretrain):
        path = files[name]
        # S1 setting: low-level energies + forces, high-level energies only.
        ingest([f"{path}@:-{N_VALID}"], stores["pretrain"], dataset=name, energy=energy,
               forces={LOW: f"forces_{LOW}"}, ranks=ranks, append=i > 0, shard_size=40, progress=False, fidelity_meta=meta)
        ingest([f"{path}@-{N_VALID}:"], stores["valid"], dataset=name, energy=energy,
               forces={LOW: f"forces_{LOW}", HIGH: f"forces_{HIGH}"}, ranks=ranks, append=i > 0, progress=False, fidelity_meta=meta)
    t = files[TARGET]
    ingest([f"{t}@:{N_TARGET_TRAIN}"], stores["target"], dataset=TARGET, energy={HIGH: f"energy_{HIGH}"},
           forces={HIGH: f"forces_{HIGH}"}, ranks={HIGH: ranks[HIGH]}, progress=False, fidelity_meta={HIGH: meta[HIGH]})
    ingest([f"{t}@{N_TARGET_TRAIN}:"], stores["target_test"], dataset=TARGET, energy={HIGH: f"energy_{HIGH}"},
           forces={HIGH: f"forces_{HIGH}"}, ranks={HIGH: ranks[HIGH]}, progress=False, fidelity_meta={HIGH: meta[HIGH]})
    from polyfid.data_shards.store import Store

    for k, p in stores.items():
        s = Store.open(p)
        print(f"  {k:<12} {s.n_structures:>4} structures {s.n_atoms:>5} atoms  "
              f"fidelities {', '.join(f.name for f in s.fidelities)}  ({p})")
    return stores


def evaluate(package: str, store: str, refit_on: str | None = None) -> dict:
    """Errors of a package on a store, per fidelity; `refit_on` first refits the head's references there."""
    from polyfid.data_shards.reader import iter_all
    from polyfid.data_shards.store import Store
    from polyfid.distributed.evaluate import evaluate_batches
    from polyfid.distributed.finetune import refit_references
    from polyfid.models.package import load_package

    s = Store.open(store)
    fids = [f.name for f in s.fidelities]
    model = load_package(package)
    if refit_on:
        refit_references(model, HIGH, [Store.open(refit_on)])
    return evaluate_batches(model, iter_all([s], fidelities=fids), fids).results()


def run_demo(workdir: Path, steps: int | None = None, workers: int = 2, overrides: list[str] | None = None) -> dict:
    """Run the whole demo in `workdir` (wiped first); returns the error tables."""
    from polyfid.distributed.config import load_config
    from polyfid.distributed.evaluate import format_table
    from polyfid.distributed.launcher import run_training

    t_start = time.perf_counter()
    workdir = Path(workdir).resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)

    t = _section("1/5 ingest the embedded QM data into zarr stores")
    stores = ingest_demo(workdir)
    print(f"  ({time.perf_counter() - t:.1f} s)")

    t = _section(f"2/5 multi-fidelity pretraining: Ray Train, {workers} DeepSpeed workers (ZeRO-1, fp32, gloo)")
    sets = [f"data.train={stores['pretrain']}", f"data.valid={stores['valid']}", f"output={workdir / 'pretrain'}",
            f"trainer.workers={workers}"] + ([f"trainer.steps={steps}"] if steps else []) + list(overrides or [])
    cfg = load_config(RECIPES / "demo.yaml", sets)
    pre = run_training(cfg)
    print(f"  package {pre['package']}; MLflow run {pre['mlflow_run_id']}; "
          f"registered models:/{pre['registered_model']}/{pre['model_version']}  ({time.perf_counter() - t:.1f} s)")

    t = _section(f"3/5 fine-tune to {TARGET} ({N_TARGET_TRAIN} {HIGH} frames), starting from the registry")
    source = (f"models:/{pre['registered_model']}/{pre['model_version']}" if pre["model_version"] else pre["package"])
    ft_cfg = load_config(RECIPES / "finetune.yaml", [
        f"finetune.source={source}", f"data.train={stores['target']}", f"output={workdir / 'finetune'}",
        f"tracking.uri={cfg.tracking.uri}", f"tracking.experiment={cfg.tracking.experiment}",
    ] + list(overrides or []))
    ft = run_training(ft_cfg)
    print(f"  package {ft['package']}; MLflow run {ft['mlflow_run_id']}  ({time.perf_counter() - t:.1f} s)")

    t = _section("4/5 evaluate")
    tables = {
        "pretrained, held-out frames of the pretraining molecules": evaluate(pre["package"], stores["valid"]),
        f"pretrained + reference refit on the target = fine-tuning step 0, {TARGET} test frames":
            evaluate(pre["package"], stores["target_test"], refit_on=stores["target"]),
        f"fine-tuned, {TARGET} test frames": evaluate(ft["package"], stores["target_test"]),
    }
    for title, res in tables.items():
        print()
        print(format_table(res, title=title))
    (workdir / "results.json").write_text(json.dumps(tables, indent=2))
    print(f"\n  ({time.perf_counter() - t:.1f} s)")

    _section("5/5 done")
    print(f"Validation {HIGH} forces above were never trained on: the pretraining store has {HIGH} energies only.")
    print(f"results: {workdir / 'results.json'}")
    print(f"total time: {time.perf_counter() - t_start:.0f} s")
    print("Open the MLflow dashboard with:")
    print(f"  polyfid ui --tracking-uri {cfg.tracking.uri}")
    return tables
