"""Distributed benchmarks (issue 5), all in one run:

1. Throughput of multi-fidelity pretraining through Ray Train + DeepSpeed (gloo) with 1 worker and with
   2 workers, on the embedded demo data; atoms/s are the medians of the MLflow windows after the first.
2. Bytes all-reduced (and all-gathered) per 1,000 gradient steps: plain data parallelism (ZeRO-1) against
   Reptile with k = 4, 8, 16 inner steps per outer step, counted on 2 real gloo ranks.

    python benchmarks/bench_distributed.py --out benchmarks/RESULTS_distributed.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from polyfid.data_shards.named import open_store

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def demo_store(tmp: Path) -> str:
    from polyfid.data_shards.demo import HIGH, LOW, demo_files
    from polyfid.data_shards.ingest import ingest

    out = str(tmp / "train.zarr")
    for i, p in enumerate(f for f in demo_files() if not f.name.startswith("formic")):
        ingest([f"{p}@:80"], out, dataset=p.name.split(".")[0], energy={LOW: f"energy_{LOW}", HIGH: f"energy_{HIGH}"},
               forces={LOW: f"forces_{LOW}"}, ranks={LOW: 0, HIGH: 1}, append=i > 0, shard_size=40, progress=False)
    return out


def throughput(store: str, tmp: Path, workers: int, steps: int) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    from polyfid.distributed.config import load_config
    from polyfid.distributed.driver.launcher import run_training

    out = tmp / f"w{workers}"
    uri = f"sqlite:///{tmp / 'bench.db'}"
    cfg = load_config(ROOT / "launch" / "recipes" / "demo.yaml", [
        f"data.train={store}", f"output={out}", f"cluster.workers={workers}", f"trainer.steps={steps}",
        "trainer.log_every=10", "trainer.valid_every=1000000", "trainer.checkpoint_every=1000000",
        f"tracking.uri={uri}", "tracking.register_as=null"])
    s = run_training(cfg)
    client = MlflowClient(uri)
    hist = {k: [m.value for m in client.get_metric_history(s["mlflow_run_id"], k)][1:]
            for k in ("atoms_per_s", "step_time_s", "data_wait_fraction", "comm_time_fraction")}
    return {k: statistics.median(v) for k, v in hist.items()} | {"wall_s": s["wall_s"]}


def _count_bytes(rank, world, out, mode, k, steps):
    import torch.distributed as tdist

    from conftest import emt_frames  # noqa: F401 - fixtures module, for sys.path side effects
    from polyfid.data_shards.reader import ShardReader
    from polyfid.distributed.config import LossConfig, TrainerConfig
    from polyfid.distributed.loop.engine import build_engine
    from polyfid.distributed.modes.reptile import ReptileExtra, Task, reptile_step
    from polyfid.distributed.modes.multifidelity import StepContext, multifidelity_step
    from polyfid.data_shards.reference_fit import fit_stores
    from polyfid.models.config import ModelConfig
    from polyfid.models.potential import Potential

    counted = {"bytes": 0}
    for name in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather"):
        orig = getattr(tdist, name)

        def wrap(*a, _orig=orig, **kw):
            t = kw.get("tensor", kw.get("input_tensor", a[0] if a else None))
            if isinstance(t, torch.Tensor):
                counted["bytes"] += t.numel() * t.element_size()
            elif isinstance(t, list):
                counted["bytes"] += sum(x.numel() * x.element_size() for x in t)
            return _orig(*a, **kw)

        setattr(tdist, name, wrap)
    store = open_store(out["store"])
    fids = [f for f in store.fidelities]
    refs = fit_stores([store], fids, sorted(int(z) for z in store.elements)).energies
    model = Potential(ModelConfig(), store.elements, fids, refs)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = TrainerConfig(steps=10**6, zero_stage=1)
    engine, _ = build_engine(model, cfg, torch.device("cpu"), reptile_epsilon=0.5 if mode == "reptile" else None)
    names = [f.name for f in fids]
    ctx = StepContext(engine, LossConfig(), names, model.config.cutoff, torch.float32, torch.device("cpu"),
                      extra=ReptileExtra([Task(0, names[0])], 1e-3))
    reader = iter(ShardReader([store], ShardReader.Config(atom_budget=256), rank=rank, world_size=world,
                              fidelities=names if mode == "plain" else [names[0]]))
    counted["bytes"] = 0
    for _ in range(steps):
        if mode == "plain":
            multifidelity_step(next(reader), ctx)
        else:
            reptile_step((0, [next(reader) for _ in range(k)]), ctx)
    if rank == 0:
        grad_steps = steps * (1 if mode == "plain" else k)
        Path(out["file"]).write_text(json.dumps({"bytes": counted["bytes"], "grad_steps": grad_steps,
                                                 "n_params": n_params}))


def comm_bytes(store: str, tmp: Path) -> dict[str, dict[str, float]]:
    from dist_utils import spawn

    res = {}
    for mode, k, steps in (("plain", 1, 32), ("reptile", 4, 8), ("reptile", 8, 4), ("reptile", 16, 2)):
        f = tmp / f"bytes_{mode}_{k}.json"
        spawn(_count_bytes, 2, {"store": store, "file": str(f)}, mode, k, steps, tmp=tempfile.mkdtemp())
        d = json.loads(f.read_text())
        res[f"{mode}" + (f" k={k}" if mode == "reptile" else "")] = {
            "bytes_per_1000_grad_steps": d["bytes"] / d["grad_steps"] * 1000, "n_params": d["n_params"]}
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS_distributed.md"))
    p.add_argument("--steps", type=int, default=200)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="polyfid-bench-"))
    store = demo_store(tmp)
    t0 = time.time()
    one = throughput(store, tmp, 1, a.steps)
    two = throughput(store, tmp, 2, a.steps)
    comm = comm_bytes(store, tmp)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    lines = [
        "## Distributed training (issue 5)",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu}), {platform.python_version()}, torch {torch.__version__}, CPU only.",
        f"Command: `python benchmarks/bench_distributed.py` ({time.time() - t0:.0f} s). Data: the embedded demo",
        "pretraining store (240 structures, real QM labels); model hipnn_ts width 64; atom budget 256 per rank.",
        "",
        "| workers | atoms/s (global) | step time (s) | data-wait fraction | comm-time fraction |",
        "|---|---|---|---|---|",
        f"| 1 | {one['atoms_per_s']:.0f} | {one['step_time_s']:.3f} | {one['data_wait_fraction']:.3f} | {one['comm_time_fraction']:.3f} |",
        f"| 2 | {two['atoms_per_s']:.0f} | {two['step_time_s']:.3f} | {two['data_wait_fraction']:.3f} | {two['comm_time_fraction']:.3f} |",
        "",
        f"Speed-up of 2 workers over 1: **{two['atoms_per_s'] / one['atoms_per_s']:.2f}×** (target ≥ 1.6×).",
        "",
        "Bytes moved by collectives (all-reduce, all-gather, reduce-scatter) per 1,000 gradient steps on 2 ranks:",
        "",
        "| mode | bytes / 1,000 gradient steps | relative to plain |",
        "|---|---|---|",
    ]
    base = comm["plain"]["bytes_per_1000_grad_steps"]
    for mode, r in comm.items():
        lines.append(f"| {mode} | {r['bytes_per_1000_grad_steps'] / 1e6:.2f} MB | {r['bytes_per_1000_grad_steps'] / base:.3f} |")
    lines += ["", f"Model parameters: {comm['plain']['n_params']}.", ""]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
