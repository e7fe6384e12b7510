"""S3, Reptile only: which Reptile settings make fine-tuning beat training from scratch, over several seeds.

    python benchmarks/bench_s3_reptile.py --workdir /tmp/s3r --seeds 0,1,2 \
        --settings "eps0.5_lr1e-3:reptile.epsilon=0.5,reptile.inner_lr=0.001" \
        --settings "eps1_lr2e-3:reptile.epsilon=1.0,reptile.inner_lr=0.002" --out benchmarks/RESULTS_s3_reptile.md

The stores, tasks, target and budgets are those of bench_s3.py (one store per molecule, each at its own level;
formic acid at ωB97X/6-31G* as the target). For every seed and every Reptile setting: pretrain with the same
number of gradient steps as bench_s3's multi-fidelity run (outer steps × k), fine-tune with the recipe's
defaults, and test. Scratch runs from a random init on the target at two learning rates (the parent's
pretraining lr and the fine-tuning lr), so that the baseline is not handicapped by its schedule; the table
compares against the better of the two, per seed. `--reuse` resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_s3  # noqa: E402


def parse_setting(text: str) -> tuple[str, list[str]]:
    """'NAME:key=value,key=value' → (NAME, ['key=value', ...])."""
    name, _, sets = text.partition(":")
    return name, [s for s in sets.split(",") if s]


def pretrain(stores: dict, work: Path, seed: int, name: str, sets: list[str], grad_steps: int, common: list[str]) -> dict:
    from polyfid.distributed.config import load_config

    k = load_config(bench_s3.RECIPES / "demo.yaml", sets).reptile.inner_steps
    steps = max(1, grad_steps // k)
    return bench_s3.train("demo.yaml", [
        f"data.train={','.join(stores['train'])}", f"data.valid={','.join(stores['valid'])}", "trainer.mode=reptile",
        f"trainer.steps={steps}", "cluster.workers=2", f"trainer.valid_every={max(1, steps // 12)}",
        f"trainer.checkpoint_every={steps}", f"output={work / f'seed{seed}' / name}"] + sets + common)


def scratch(stores: dict, work: Path, seed: int, parent: str, lr: float, ft_common: list[str], tag: str = "") -> dict:
    """A random init on the target: the parent's architecture and the fine-tuning budget, at learning rate `lr`."""
    from polyfid.distributed.config import load_config
    from polyfid.distributed.finetune.scratch import scratch_config
    from polyfid.distributed.driver.launcher import run_training
    from polyfid.models.package import read_metadata

    out = work / f"seed{seed}" / f"scratch_lr{lr:g}{tag}"
    if bench_s3.finished(out):
        return bench_s3.finished(out)
    cfg = load_config(bench_s3.RECIPES / "finetune.yaml", [f"finetune.source={parent}", f"output={out}"] + ft_common)
    sc = scratch_config(cfg, read_metadata(parent))
    sc.output, sc.trainer.lr = str(out), lr
    return run_training(sc, shutdown_ray=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/polyfid-s3-reptile"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--settings", action="append", required=True, help="NAME:key=value,... (repeatable)")
    ap.add_argument("--pretrain-steps", type=int, default=1200, help="gradient steps (outer steps × k)")
    ap.add_argument("--finetune-steps", type=int, default=800)
    ap.add_argument("--scratch-lrs", default="0.001,0.002", help="learning rates of the scratch runs (comma-separated)")
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--ft-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override for the fine-tuning and scratch runs only (e.g. trainer.ema_decay=0.99)")
    ap.add_argument("--tag", default="", help="suffix of the fine-tuning and scratch run folders, to keep "
                    "runs with other --ft-set apart (the parents are shared)")
    ap.add_argument("--no-scratch", action="store_true", help="fine-tune only")
    a = ap.parse_args()
    bench_s3.REUSE = a.reuse
    t_start = time.perf_counter()
    work = a.workdir.resolve()
    stores = bench_s3.stores_of(work) if (work / "stores").exists() else bench_s3.build_stores(work)
    rows = []
    for seed in (int(s) for s in a.seeds.split(",")):
        common = [f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.experiment=s3-reptile",
                  "tracking.register_as=null", f"trainer.seed={seed}"]
        ft_common = [f"data.train={stores['target'][0]}", f"data.valid={stores['target_valid'][0]}",
                     f"trainer.steps={a.finetune_steps}"] + common + a.ft_set
        for name, sets in map(parse_setting, a.settings):
            parent = pretrain(stores, work, seed, name, sets, a.pretrain_steps, common)
            ft = bench_s3.train("finetune.yaml", [f"finetune.source={parent['package']}",
                                                  f"output={work / f'seed{seed}' / f'ft_{name}{a.tag}'}"] + ft_common)
            rows.append({"seed": seed, "run": f"reptile {name}{a.tag}", "test": bench_s3.test_errors(ft["package"], stores["target_test"][0]),
                         "parent": parent.get("validation") or parent.get("final_validation")})
            print(f"seed {seed} {name}: {rows[-1]['test']}", flush=True)
        for lr in [] if a.no_scratch else sorted({float(x) for x in a.scratch_lrs.split(",") if x}):
            s = scratch(stores, work, seed, parent["package"], lr, ft_common, a.tag)
            rows.append({"seed": seed, "run": f"scratch lr {lr:g}{a.tag}", "test": bench_s3.test_errors(s["package"], stores["target_test"][0])})
            print(f"seed {seed} scratch lr {lr:g}: {rows[-1]['test']}", flush=True)
    (work / f"results_reptile{a.tag}.json").write_text(json.dumps(rows, indent=2, default=str))
    text = report(rows, a, time.perf_counter() - t_start)
    print(text)
    if a.out:
        a.out.write_text(text)


def report(rows: list[dict], a, wall: float) -> str:
    seeds = sorted({r["seed"] for r in rows})
    runs = list(dict.fromkeys(r["run"] for r in rows))
    cell = {(r["seed"], r["run"]): r["test"] for r in rows}
    best_scratch = {s: min((cell[(s, r)] for r in runs if r.startswith("scratch") and (s, r) in cell),
                           key=lambda t: t["forces_mae"], default=None) for s in seeds}
    lines = ["# S3, Reptile settings against training from scratch (formic acid at ωB97X/6-31G*, test frames)", "",
             f"Command: `python benchmarks/bench_s3_reptile.py {' '.join(sys.argv[1:])}`", "",
             f"Machine: {platform.machine()}, 2 shared CPU cores (corpus labelling ran niced beside it), no GPU. "
             f"Wall time: {wall / 60:.1f} min. Pretraining: {a.pretrain_steps} gradient steps; fine-tuning and "
             f"scratch: up to {a.finetune_steps} steps with early stopping on 20 validation frames.", "",
             "Each cell is test E MAE (meV) / F MAE (meV/Å). 'Best scratch' is the better scratch run of that seed "
             "by forces.", "",
             "| run | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | beats best scratch on F |",
             "|---|" + "---|" * (len(seeds) + 2)]
    for run in runs + (["best scratch"] if all(best_scratch.values()) else []):
        tests = [best_scratch[s] if run == "best scratch" else cell.get((s, run)) for s in seeds]
        cells = [f"{t['energy_mae'] * 1e3:.1f} / {t['forces_mae'] * 1e3:.0f}" if t else "-" for t in tests]
        have = [t for t in tests if t]
        mean = (f"{statistics.mean(t['energy_mae'] for t in have) * 1e3:.1f} / "
                f"{statistics.mean(t['forces_mae'] for t in have) * 1e3:.0f}") if have else "-"
        wins = "-" if run.startswith("scratch") or run == "best scratch" or not all(best_scratch.values()) else (
            f"{sum(1 for s, t in zip(seeds, tests) if t and t['forces_mae'] < best_scratch[s]['forces_mae'])}/{len(seeds)}")
        lines.append(f"| {run} | " + " | ".join(cells) + f" | {mean} | {wins} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
