"""GPU checks: bf16 multi-fidelity training through the worker loop on one GPU over NCCL, then training
and inference atoms/s in fp32 and bf16 for each model kind.

    python benchmarks/gpu_check.py --train TRAIN.zarr --valid VALID.zarr --out OUT [--steps 300]
        [--target TARGET.zarr --target-valid TARGET_VALID.zarr --finetune-steps 200]

Ray and MLflow are not needed here: the worker loop runs in this process as rank 0 of a 1-rank NCCL group.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from polyfid.data_shards.named import open_store


def timed_steps(kind: str, precision: str, stores, batches, n_warm: int = 5) -> dict[str, float]:
    """Training and inference atoms/s of a fresh model on fixed batches."""
    from polyfid.distributed.config import LossConfig, TrainerConfig
    from polyfid.distributed.loop.engine import build_engine, compute_dtype
    from polyfid.distributed.modes.multifidelity import StepContext, multifidelity_step, prepare
    from polyfid.distributed.config import RunConfig
    from polyfid.distributed.loop.trainer import build_model

    cfg = RunConfig()
    cfg.model.kind, cfg.model.width, cfg.model.n_interactions, cfg.model.n_atom_layers = kind, 128, 2, 3
    cfg.model.l_max = 3 if kind == "hiphop" else 2
    model, _ = build_model(cfg, stores)  # the joint reference fit with per-head scale/shift, as in training
    mcfg = cfg.model
    fids = model.fidelities
    device = torch.device("cuda")
    engine, prec = build_engine(model, TrainerConfig(precision=precision, steps=10**6), device)
    dtype = compute_dtype(prec)
    ctx = StepContext(engine, LossConfig(), [f.name for f in fids], mcfg.cutoff, dtype, device)
    for b in batches[:n_warm]:
        multifidelity_step(b, ctx)
    torch.cuda.synchronize()
    t0, atoms = time.perf_counter(), 0
    for b in batches[n_warm:]:
        multifidelity_step(b, ctx)
        atoms += int(b["n_atoms"].sum())
    torch.cuda.synchronize()
    train = atoms / (time.perf_counter() - t0)
    graphs = [prepare(b, ctx)[0] for b in batches]
    module = engine.module.eval()
    for g in graphs[:n_warm]:
        module(g, force_heads=[len(fids) - 1])
    torch.cuda.synchronize()
    t0, atoms = time.perf_counter(), 0
    for g in graphs[n_warm:]:
        module(g, force_heads=[len(fids) - 1])
        atoms += g.n_atoms
    torch.cuda.synchronize()
    return {"train_atoms_per_s": train, "inference_atoms_per_s": atoms / (time.perf_counter() - t0),
            "atoms_per_batch": float(sum(int(b["n_atoms"].sum()) for b in batches) / len(batches))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--train", required=True, help="training stores, comma-separated (one per dataset, as users ingest)")
    p.add_argument("--valid", required=True, help="validation stores, comma-separated")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--target", help="a fine-tuning target store: also fine-tune the bf16 package on the GPU")
    p.add_argument("--target-valid", help="its validation store (step-0 error, early stopping)")
    p.add_argument("--finetune-steps", type=int, default=200)
    a = p.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl")
    from polyfid.data_shards.reader import ShardReader, iter_all
    from polyfid.distributed.config import load_config
    from polyfid.evaluation.metrics import evaluate_batches
    from polyfid.distributed.driver.worker import train_loop_per_worker
    from polyfid.models.package import load_package

    out = Path(a.out)
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "backend": dist.get_backend()}
    cfg = load_config(Path(__file__).parents[1] / "launch" / "recipes" / "demo.yaml", [
        f"data.train={a.train}", f"data.valid={a.valid}", "cluster.workers=1", f"trainer.steps={a.steps}",
        "tracking.enabled=false", f"output={out / 'bf16_run'}", "trainer.valid_every=100000",
    ])
    cfg.resolve_paths()
    t0 = time.perf_counter()
    train_loop_per_worker({"run": cfg.to_dict(), "mlflow_run_id": None})
    report["bf16_run"] = {"steps": a.steps, "wall_s": time.perf_counter() - t0, "precision": "auto (bf16 on GPU)"}
    model = load_package(out / "bf16_run" / "package")
    valid = [open_store(v) for v in a.valid.split(",")]
    fids = sorted({f.name for v in valid for f in v.fidelities})
    report["bf16_run"]["valid_errors_fp32_eval"] = evaluate_batches(model, iter_all(valid, fidelities=fids), fids).results()

    if a.target:  # fine-tuning on the GPU: a new or existing head, replay from the pretraining store, early stopping
        from polyfid.distributed.finetune.forgetting import measure_forgetting
        from polyfid.models.package import read_metadata

        ft = load_config(Path(__file__).parents[1] / "launch" / "recipes" / "finetune.yaml", [
            f"finetune.source={out / 'bf16_run' / 'package'}", f"data.train={a.target}", f"data.valid={a.target_valid}",
            f"finetune.replay_fraction=0.25", f"finetune.replay_stores={a.train}", "cluster.workers=1",
            f"trainer.steps={a.finetune_steps}", "trainer.valid_every=25", "tracking.enabled=false",
            f"output={out / 'ft_run'}",
        ])
        ft.resolve_paths()
        t0 = time.perf_counter()
        train_loop_per_worker({"run": ft.to_dict(), "mlflow_run_id": None})
        pkg = out / "ft_run" / "package"
        report["finetune"] = {
            "steps_max": a.finetune_steps, "wall_s": time.perf_counter() - t0,
            "step0": json.loads((out / "ft_run" / "step0_validation.json").read_text()),
            "best": json.loads((out / "ft_run" / "best.json").read_text()),
            "replay": read_metadata(pkg)["lineage"]["replay"],
            "forgetting": measure_forgetting(str(out / "bf16_run" / "package"), str(pkg),
                                             read_metadata(out / "bf16_run" / "package")),
        }
        tv = [open_store(a.target_valid)]
        tf = [f.name for f in tv[0].fidelities]
        report["finetune"]["valid_errors"] = evaluate_batches(load_package(pkg), iter_all(tv, fidelities=tf), tf).results()
        print("finetune", json.dumps(report["finetune"], indent=1), flush=True)

    stores = [open_store(t) for t in a.train.split(",")]
    reader = ShardReader(stores, ShardReader.Config(atom_budget=4096, shuffle=True, loop=True, prefetch=0), fidelities=fids)
    it = iter(reader)
    batches = [next(it) for _ in range(35)]
    report["throughput"] = {}
    for kind in ("hipnn_ts", "hiphop"):
        for precision in ("fp32", "bf16"):
            r = timed_steps(kind, precision, stores, batches)
            report["throughput"][f"{kind}/{precision}"] = r
            print(kind, precision, r, flush=True)
    (out / "gpu_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
