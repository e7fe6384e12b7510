"""S3 on real QM data: Reptile vs multi-fidelity vs no pretraining, then fine-tuning to an unseen molecule at an
unseen level of theory.

    python benchmarks/bench_s3.py --workdir /tmp/polyfid-s3 --out benchmarks/RESULTS_s3.md

Pretraining tasks, each at its own level: ethanol at GFN2-xTB, malonaldehyde at B3LYP/6-31G*, methylamine at
GFN2-xTB (energies and forces, frames :80; frames 80: are each task's validation set). The target is formic acid,
a molecule no pretraining run saw, at ωB97X/6-31G*, a level no pretraining run saw: 50 training frames, 20 for
validation (early stopping), 30 for the test. The bond scan (O–H stretch) and the torsion scan (H–O–C=O) of
formic acid have ωB97X/6-31G* reference energies (data_shards/demo/formic_acid_scans.extxyz.gz).

Everything runs through the real path: Ray Train workers with DeepSpeed engines, zarr stores, an MLflow sqlite
store. Same model and same gradient-step budget for both pretraining modes (a Reptile outer step is k inner steps).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

from polyfid.data_shards.demo import EXTRA, HIGH, LOW, demo_files, demo_scans

RECIPES = Path(__file__).parents[1] / "launch" / "recipes"
TASKS = {"ethanol": LOW, "malonaldehyde": HIGH, "methylamine": LOW}
TARGET = "formic_acid"
RANKS = {LOW: 0, HIGH: 1, EXTRA: 2}
META = {LOW: {"method": "GFN2-xTB", "code": "tblite"}, HIGH: {"method": "B3LYP", "basis": "6-31G*", "code": "PySCF"},
        EXTRA: {"method": "wB97X", "basis": "6-31G*", "code": "PySCF"}}


def build_stores(work: Path) -> dict[str, list[str]]:
    """One store per pretraining task (train and valid), and the target's train / valid / test stores."""
    from polyfid.data_shards.ingest import ingest

    files = {p.name.split(".")[0]: p for p in demo_files()}
    out: dict[str, list[str]] = {"train": [], "valid": []}
    for name, fid in TASKS.items():
        for split, sl in (("train", ":80"), ("valid", "80:")):
            path = work / "stores" / f"{name}_{split}.zarr"
            ingest([f"{files[name]}@{sl}"], path, dataset=name, energy={fid: f"energy_{fid}"},
                   forces={fid: f"forces_{fid}"}, ranks={fid: RANKS[fid]}, progress=False, fidelity_meta={fid: META[fid]})
            out[split].append(str(path))
    for split, sl in (("target", ":50"), ("target_valid", "50:70"), ("target_test", "70:")):
        path = work / "stores" / f"{TARGET}_{split}.zarr"
        ingest([f"{files[TARGET]}@{sl}"], path, dataset=TARGET, energy={EXTRA: f"energy_{EXTRA}"},
               forces={EXTRA: f"forces_{EXTRA}"}, ranks={EXTRA: RANKS[EXTRA]}, progress=False,
               fidelity_meta={EXTRA: META[EXTRA]})
        out[split] = [str(path)]
    return out


REUSE = False  # --reuse: a run whose output folder already holds summary.json and its package is not run again


def stores_of(work: Path) -> dict[str, list[str]]:
    """The stores that build_stores wrote into `work` earlier (for --reuse)."""
    d = work / "stores"
    out = {split: [str(d / f"{name}_{split}.zarr") for name in TASKS] for split in ("train", "valid")}
    for split in ("target", "target_valid", "target_test"):
        out[split] = [str(d / f"{TARGET}_{split}.zarr")]
    return out


def finished(output) -> dict | None:
    """The summary of a run in `output` that ended with a package; None for a run that never ran, or was stopped
    (its summary says `stopped` and names no package), so that --reuse resumes it from its checkpoint."""
    done = Path(output) / "summary.json"
    s = json.loads(done.read_text()) if done.exists() else {}
    if s.get("package") and Path(s["package"]).exists():
        print(f"reused {done}", flush=True)
        return s
    return None


def train(recipe: str, sets: list[str]) -> dict:
    from polyfid.distributed.config import load_config
    from polyfid.distributed.driver.launcher import run_training

    cfg = load_config(RECIPES / recipe, sets)
    return (REUSE and finished(cfg.output)) or run_training(cfg, shutdown_ray=False)


def scans(package: str) -> dict[str, dict]:
    """Bond and torsion scans of the fine-tuned head against the ωB97X/6-31G* reference scans."""
    import ase.io

    from polyfid.evaluation.pes import ScanResult, as_calculator, energies
    from polyfid.models.package import load_package

    frames = ase.io.read(demo_scans(), ":")
    calc = as_calculator(load_package(package), EXTRA)
    out = {}
    for kind in ("bond", "torsion"):
        geoms = [a for a in frames if a.info["scan"] == kind]
        x = np.array([a.info["scan_value"] for a in geoms])
        ref = np.array([a.info[f"energy_{EXTRA}"] for a in geoms])
        atoms = tuple(int(i) for i in re.findall(r"\d+", str(geoms[0].info.get("scan_coord", ""))))
        res = ScanResult(kind, atoms, x, energies(calc, geoms), EXTRA, ref, EXTRA)
        out[kind] = res.metrics()
    return out


def test_errors(package: str, store: str) -> dict:
    from polyfid.distributed.finetune.scratch import compare_table

    return compare_table({"m": package}, [store])["m"][EXTRA]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/polyfid-s3"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--pretrain-steps", type=int, default=1200, help="gradient steps of pretraining")
    ap.add_argument("--finetune-steps", type=int, default=400)
    ap.add_argument("--replay", type=float, default=0.25, help="replay fraction of the with-replay fine-tuning")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lr-sweep", default="", help="fine-tuning learning rates to compare (comma-separated; no replay)")
    ap.add_argument("--warmup-sweep", default="", help="fine-tuning warm-up steps to compare with each --lr-sweep value")
    ap.add_argument("--sweep-modes", default="multifidelity,reptile", help="pretraining modes whose parents are swept")
    ap.add_argument("--reuse", action="store_true",
                    help="resume an interrupted benchmark in the same --workdir: keep its stores and finished runs")
    a = ap.parse_args()
    global REUSE
    REUSE = a.reuse
    t_start = time.perf_counter()
    work = a.workdir.resolve()
    if work.exists() and not a.reuse:
        import shutil

        shutil.rmtree(work)
    stores = stores_of(work) if a.reuse and (work / "stores").exists() else build_stores(work)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    common = [f"tracking.uri={uri}", "tracking.experiment=s3", "tracking.register_as=null", f"trainer.seed={a.seed}"]
    from polyfid.distributed.config import load_config

    k = load_config(RECIPES / "demo.yaml", []).reptile.inner_steps
    parents: dict[str, dict] = {}
    for mode, steps in (("multifidelity", a.pretrain_steps), ("reptile", max(1, a.pretrain_steps // k))):
        sets = [f"data.train={','.join(stores['train'])}", f"data.valid={','.join(stores['valid'])}",
                f"trainer.mode={mode}", f"trainer.steps={steps}", f"cluster.workers={a.workers}",
                f"trainer.valid_every={max(1, steps // 12)}", f"trainer.checkpoint_every={steps}",
                f"output={work / mode}"] + common
        t0 = time.perf_counter()
        parents[mode] = train("demo.yaml", sets)
        parents[mode].setdefault("pretrain_s", parents[mode].get("wall_s", time.perf_counter() - t0))
        print(f"pretrained {mode}: {parents[mode]['package']} ({parents[mode]['pretrain_s']:.0f} s)", flush=True)

    rows = []
    ft_common = [f"data.train={stores['target'][0]}", f"data.valid={stores['target_valid'][0]}",
                 f"trainer.steps={a.finetune_steps}"] + common
    for mode, parent in parents.items():
        for replay in (0.0, a.replay):
            out = work / f"ft_{mode}_replay{replay:g}"
            s = train("finetune.yaml", [f"finetune.source={parent['package']}", f"finetune.replay_fraction={replay}",
                                        f"output={out}"] + ft_common)
            rows.append({"pretraining": mode, "replay": replay, "package": s["package"], "summary": s})
            print(f"fine-tuned {mode} replay {replay}: {s['package']}", flush=True)
    sweep = sweep_finetuning(a, parents, ft_common, work) if a.lr_sweep else []
    # no pretraining: the same architecture and budget from a random init on the target alone
    from polyfid.distributed.finetune.scratch import scratch_config
    from polyfid.models.package import read_metadata

    ft_cfg = load_config(RECIPES / "finetune.yaml", [f"finetune.source={parents['multifidelity']['package']}",
                                                      f"output={work / 'none'}"] + ft_common)
    sc = scratch_config(ft_cfg, read_metadata(parents["multifidelity"]["package"]))
    sc.output = str(work / "none")
    from polyfid.distributed.driver.launcher import run_training

    s = (a.reuse and finished(work / "none")) or run_training(sc, shutdown_ray=False)
    rows.append({"pretraining": "none", "replay": None, "package": s["package"], "summary": s})

    for r in rows:
        r["test"] = test_errors(r["package"], stores["target_test"][0])
        r["scans"] = scans(r["package"])
        r["forgetting"] = r["summary"].get("forgetting")
        r["step0"] = (r["summary"].get("step0_validation") or {}).get(EXTRA)
        r["best"] = r["summary"].get("best")
    for r in sweep:
        r["test"] = test_errors(r["package"], stores["target_test"][0])
    text = report(rows, a, time.perf_counter() - t_start) + sweep_report(sweep)
    print(text)
    (work / "results.json").write_text(json.dumps(rows, indent=2, default=str))
    if a.out:
        a.out.write_text(text)


def sweep_finetuning(a, parents: dict[str, dict], ft_common: list[str], work: Path) -> list[dict]:
    """Fine-tune each parent (no replay) at every (lr, warm-up) of the sweep: how the defaults were chosen."""
    rows = []
    warmups = [int(w) for w in a.warmup_sweep.split(",") if w] or [None]
    for mode, parent in parents.items():
        if mode not in a.sweep_modes.split(","):
            continue
        for lr in (float(x) for x in a.lr_sweep.split(",") if x):
            for warmup in warmups:
                extra = [f"trainer.lr={lr}"] + ([f"trainer.warmup_steps={warmup}"] if warmup is not None else [])
                out = work / f"sweep_{mode}_lr{lr:g}_w{warmup}"
                s = train("finetune.yaml", [f"finetune.source={parent['package']}", f"output={out}"] + extra + ft_common)
                rows.append({"pretraining": mode, "lr": lr, "warmup": warmup, "package": s["package"],
                             "best": s.get("best")})
                print(f"sweep {mode} lr {lr:g} warm-up {warmup}: {s['package']}", flush=True)
    return rows


def sweep_report(rows: list[dict]) -> str:
    """The fine-tuning learning-rate / warm-up table."""
    if not rows:
        return ""
    lines = ["", "## Fine-tuning learning rate and warm-up (no replay; test frames)", "",
             "| pretraining | lr | warm-up | best step | test E MAE (meV) | test F MAE (meV/Å) |", "|---|---|---|---|---|---|"]
    for r in rows:
        best = (r.get("best") or {}).get("best_step", "-")
        lines.append(f"| {r['pretraining']} | {r['lr']:g} | {r['warmup'] if r['warmup'] is not None else 'recipe'} | "
                     f"{best} | {r['test']['energy_mae'] * 1000:.1f} | {r['test']['forces_mae'] * 1000:.1f} |")
    return "\n".join(lines) + "\n"


def report(rows: list[dict], a, wall: float) -> str:
    """The S3 tables in markdown."""
    lines = ["# S3: pretraining mode → fine-tuning to an unseen molecule at an unseen level", "",
             f"Command: `python benchmarks/bench_s3.py {' '.join(sys.argv[1:])}`", "",
             f"Machine: {platform.machine()}, 2 shared CPU cores (other jobs ran at the same time), no GPU. "
             f"Wall time of the whole benchmark: {wall / 60:.1f} min. One seed ({a.seed}).", "",
             f"Pretraining: {a.pretrain_steps} gradient steps of the demo recipe's model (HIP-NN-TS, width 64) on "
             "ethanol@GFN2-xTB, malonaldehyde@B3LYP/6-31G*, methylamine@GFN2-xTB (80 frames each, energies and "
             f"forces). Reptile: the same {a.pretrain_steps} gradient steps, as outer steps of k inner steps each. Fine-tuning: formic acid "
             f"at ωB97X/6-31G* (a new head, initialised from the closest level, B3LYP), 50 frames, up to "
             f"{a.finetune_steps} steps, early stopping on 20 validation frames; test on 30 other frames. "
             "None: the same architecture trained from a random init on the same 50 frames and budget.", "",
             "## Target: formic acid at ωB97X/6-31G*", "",
             "| pretraining | replay | step-0 E / F MAE | test E MAE (meV) | test F MAE (meV/Å) | bond scan MAE (meV) | "
             "bond roughness (ref) | bond spurious extrema | torsion scan MAE (meV) | torsion spurious extrema |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, b, tor = r["test"], r["scans"]["bond"], r["scans"]["torsion"]
        s0 = f"{r['step0']['energy_mae'] * 1000:.0f} / {r['step0']['forces_mae'] * 1000:.0f}" if r.get("step0") else "-"
        rep = "-" if r["replay"] is None else f"{r['replay']:g}"
        lines.append(f"| {r['pretraining']} | {rep} | {s0} | {t['energy_mae'] * 1000:.1f} | {t['forces_mae'] * 1000:.1f} | "
                     f"{b['mae_offset_ev'] * 1000:.1f} | {b['roughness']:.3g} ({b['roughness_ref']:.3g}) | "
                     f"{b['spurious_extrema']:+d} | {tor['mae_offset_ev'] * 1000:.1f} | {tor['spurious_extrema']:+d} |")
    lines += ["", "## Forgetting on the pretraining tasks (fine-tuned − parent, on the tasks' validation frames)", "",
              "| pretraining | replay | head | E MAE parent → fine-tuned (meV) | F MAE parent → fine-tuned (meV/Å) |",
              "|---|---|---|---|---|"]
    for r in rows:
        for fid, f in (r.get("forgetting") or {}).items():
            lines.append(f"| {r['pretraining']} | {r['replay']:g} | {fid} | {f['energy_mae_parent'] * 1000:.1f} → "
                         f"{f['energy_mae_finetuned'] * 1000:.1f} | {f['forces_mae_parent'] * 1000:.1f} → "
                         f"{f['forces_mae_finetuned'] * 1000:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
