"""S1 on real QM data: does multi-fidelity training with low-level forces and a few high-level energies reach a
model trained on high-level forces?

    python benchmarks/bench_s1.py --workdir /tmp/polyfid-s1 --steps 1200 --seeds 0,1,2 --subset 0.25,0.5 \
        --head-design independent,delta --json benchmarks/s1.json

Data: the embedded demo set (data_shards/demo): ethanol, malonaldehyde and methylamine, 100 MD frames each,
labelled with GFN2-xTB (low, `gfn2_xtb`) and B3LYP/6-31G* (high, `b3lyp_631gs`) energies and forces. Frames
:80 of each molecule train, frames 80: are the test split of every variant (high-level energies and forces).
- (a) high-level energies only;
- (b) high-level energies and forces;
- (c) low-level energies and forces on every training frame, high-level energies on every k-th (--subset 1/k).
Same model, recipe (launch/recipes/demo.yaml), seed and step budget for all; every run goes through the real
path: run_training -> Ray Train workers -> DeepSpeed engines -> package, evaluated on the test store.
A run whose package exists in the workdir is reused (so a sweep can be extended); --fresh retrains.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from polyfid.data_shards.demo import EXTRA, HIGH, LOW, demo_files
from polyfid.launch.demo import (
    N_VALID, S1_VARIANTS, TARGET, format_s1_table, ingest_heldout, ingest_variant, s1_errors, s1_labels, train_s1,
)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def molecules_with(levels: tuple[str, str]) -> list[str]:
    """The molecules labelled at both levels: the three pretraining molecules, or formic acid for wB97X."""
    names = sorted(p.name.split(".")[0] for p in demo_files())
    return [TARGET] if EXTRA in levels else [n for n in names if n != TARGET]


def run_one(name: str, store: str, work: Path, sets: list[str], test: str, fresh: bool, high: str,
            staged: tuple[str, int] | None = None) -> dict:
    """Train (or reuse) one run and return its test errors and wall time.

    `staged` = (low-level store, steps): first train on the low level alone for that many steps, then fine-tune
    from it on `store` for the rest; the fine-tune adds the high head initialised from the low one.
    """
    import shutil

    out = work / "runs" / name
    record = out / "s1.json"
    if record.exists() and not fresh:
        return json.loads(record.read_text())
    t = time.perf_counter()
    if staged:
        first = work / "runs" / f"{name}_stage1"
        shutil.rmtree(first, ignore_errors=True)
        total = int(next(x for x in reversed(sets) if x.startswith("trainer.steps=")).split("=")[1])
        pkg = train_s1(staged[0], first, sets + [f"trainer.steps={staged[1]}"])["package"]
        sets = sets + [f"finetune.source={pkg}", f"trainer.steps={total - staged[1]}"]
    shutil.rmtree(out, ignore_errors=True)
    summary = train_s1(store, out, sets)
    wall = time.perf_counter() - t
    res = dict(s1_errors(summary["package"], test, high), wall_s=wall, train_wall_s=summary["wall_s"], sets=sets)
    record.write_text(json.dumps(res, indent=2))
    print(f"  {name}: E MAE {res['energy_mae']:.1f} meV, F MAE {res['forces_mae']:.1f} meV/Å ({wall:.0f} s)",
          flush=True)
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/polyfid-s1")
    p.add_argument("--steps", type=int, default=1200, help="optimiser steps of every run (the demo's budget)")
    p.add_argument("--seeds", default="0", help="comma-separated trainer seeds")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--subset", default="0.5", help="comma-separated shares of frames with high-level energies (c)")
    p.add_argument("--head-design", default="independent", help="comma-separated: independent, delta (variant c)")
    p.add_argument("--variants", default="a,b,c")
    p.add_argument("--pair", default=f"{LOW}:{HIGH}",
                   help=f"LOW:HIGH levels (default {LOW}:{HIGH} on the three pretraining molecules; a pair with "
                   f"{EXTRA} uses formic acid, the one molecule labelled at all three levels)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the (c) runs only (loss weights, say); repeatable")
    p.add_argument("--set-all", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--staged", action="store_true",
                   help="(c) in two stages of half the steps: the low level alone, then both, the high head "
                   "initialised from the low head (fine-tuning path)")
    p.add_argument("--tag", default="", help="suffix of the (c) run names, to keep runs with other --set apart")
    p.add_argument("--fresh", action="store_true", help="retrain runs whose results exist in the workdir")
    p.add_argument("--json", default=None, help="write all results here (default WORKDIR/s1.json)")
    a = p.parse_args(argv)

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "polyfid" / "torch_extensions"))
    work = Path(a.workdir).resolve()
    seeds = [int(x) for x in a.seeds.split(",") if x]
    fractions = floats(a.subset)
    designs = [d for d in a.head_design.split(",") if d]
    variants = [v for v in a.variants.split(",") if v]
    low, high = a.pair.split(":")
    prefix = "" if (low, high) == (LOW, HIGH) else f"{low}-{high}_"  # (c) depends on both levels
    prefix_ab = "" if high == HIGH else f"{high}_"  # (a) and (b) on the high level only
    molecules = molecules_with((low, high))
    t0 = time.perf_counter()
    stores_dir = work / "stores"
    stores_dir.mkdir(parents=True, exist_ok=True)
    stores = {}
    for v, f in [("a", 1.0), ("b", 1.0)] + [("c", f) for f in fractions]:
        key = v if v != "c" else f"c{round(f * 100)}"
        path = stores_dir / f"{prefix if v == 'c' else prefix_ab}s1_{key}.zarr"
        if not path.exists():
            ingest_variant(str(path), v, f, molecules, low, high)
        stores[key] = str(path)
    if a.staged:
        stores["low"] = str(stores_dir / f"{prefix}s1_low.zarr")
        if not Path(stores["low"]).exists():  # variant b's layout at the low level: low E+F only
            ingest_variant(stores["low"], "b", 1.0, molecules, low, low)
    test = str(stores_dir / f"{prefix}test.zarr")  # the same frames for every pair with this high level
    if not Path(test).exists():
        ingest_heldout(test, molecules, (low, high))
    base = [f"trainer.steps={a.steps}", f"cluster.workers={a.workers}"] + a.set_all

    rows, runs = [], {}
    for v in variants:
        if v in ("a", "b"):
            configs = [(f"{prefix_ab}{v}{a.tag if a.set_all else ''}", stores[v], [], "-", None)]
        else:
            configs = [(f"{prefix}c{round(f * 100)}_{d}{'_staged' if a.staged else ''}{a.tag}", stores[f"c{round(f * 100)}"], [f"model.head_design={d}"] + a.set,
                        d, f) for f in fractions for d in designs]
        for name, store, extra, design, frac in configs:
            results = []
            for seed in seeds:
                key = f"{name}_s{seed}_n{a.steps}"
                staged = (stores["low"], a.steps // 2) if a.staged and v == "c" else None
                runs[key] = run_one(key, store, work, base + extra + [f"trainer.seed={seed}"], test, a.fresh, high,
                                    staged)
                results.append(runs[key])
            heads = (f"{design}, low first" if a.staged else design) if v == "c" else "one head"
            extra_txt = (" " + " ".join(a.set)) if v == "c" and a.set else ""
            rows.append({"variant": v, "labels": s1_labels(v, frac or 1.0, low, high) + extra_txt, "heads": heads, "runs": results,
                         "description": S1_VARIANTS[v]})
    table = format_s1_table(rows)
    print()
    print(f"S1, {high} errors on the test split (last {N_VALID} frames of {', '.join(molecules)}), {a.steps} steps, "
          f"{a.workers} workers, seeds {a.seeds}")
    print(table)
    out = {
        "command": "python benchmarks/bench_s1.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
        "pair": [low, high], "molecules": molecules, "steps": a.steps, "workers": a.workers, "seeds": seeds, "rows": rows, "table": table,
        "wall_s": time.perf_counter() - t0,
    }
    path = Path(a.json) if a.json else work / "s1.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"\nresults: {path}  ({out['wall_s']:.0f} s)")
    import ray

    if ray.is_initialized():
        ray.shutdown()
    return out


if __name__ == "__main__":
    main()
