"""S3 at corpus scale: no pretraining vs multi-fidelity vs Reptile, then fine-tuning to a drug-like molecule.

    python benchmarks/bench_s3_corpus.py --workdir runs/s3c --pretrain-steps 12000 \
        --mf-package runs/foundation/pretrain/package --seeds 0,1,2 --out benchmarks/RESULTS_s3_corpus.md

Pretraining (one run each, the same model and the same number of gradient steps, `launch/recipes/foundation.yaml`):
- multi-fidelity over every level's training split (one head per level); `--mf-package` reuses a package trained
  that way with the same recipe and steps (the foundation checkpoint), instead of training it again;
- Reptile over the (dataset, level) tasks: one task per corpus store, `pretrain-steps / k` outer steps of k inner
  steps;
- none: the fine-tuning from a random init (the parent's architecture, the same budget, the pretraining lr).
Fine-tuning (`launch/recipes/finetune.yaml`, per seed): the S3 target, paracetamol, at wB97X/6-31G*, on the first
`--target-n` (50) structures of its train split, early stopping on its valid split; tested on its test split, and
on its O-H bond and amide torsion scans against the wB97X/6-31G* reference (MAE after the mean offset, roughness,
spurious extrema). Each parent is fine-tuned without replay and with `--replay`; forgetting is measured on the
parent's validation stores. A finished run in the workdir is reused, so the command resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_s3  # noqa: E402
from bench_s1_corpus import read_frames, write_store  # noqa: E402

RECIPES = bench_s3.RECIPES
HIGH = "wb97x_631gs"
TARGET = "target_paracetamol"
bench_s3.REUSE = True  # a finished run in the workdir is reused, so the command resumes
finished, run = bench_s3.finished, bench_s3.train


def target_stores(files: Path, work: Path, n: int) -> dict[str, str]:
    """wB97X-only stores of the target: `n` training structures, its valid and test splits."""
    tmp, out = work / "tmp", work / "stores"
    train = [f for f in read_frames(files, TARGET, "train", tmp) if f"forces_{HIGH}" in f.arrays]
    if len(train) < n:
        raise SystemExit(f"{files}/{TARGET}_train.extxyz.gz has {len(train)} structures with {HIGH} forces; "
                         f"{n} are needed (is the corpus labelled?)")
    stores = {"train": write_store(train[:n], out / f"target{n}.zarr", HIGH, True)}
    for split in ("valid", "test"):
        frames = [f for f in read_frames(files, TARGET, split, tmp) if f"forces_{HIGH}" in f.arrays]
        stores[split] = write_store(frames, out / f"target_{split}.zarr", HIGH, True)
    return stores


def pretrain(a: argparse.Namespace, stores: dict, work: Path) -> dict[str, str]:
    """mode -> parent package: multi-fidelity (given or trained) and Reptile, same recipe and gradient steps."""
    from polyfid.distributed.config import load_config

    train = [s["train"] for s in stores.values() if "train" in s]
    valid = [s["valid"] for s in stores.values() if "valid" in s]
    k = load_config(RECIPES / "foundation.yaml", a.set).reptile.inner_steps
    base = [f"data.train={','.join(train)}", f"data.valid={','.join(valid)}", f"cluster.workers={a.workers}",
            "tracking.register_as=null", f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.experiment=s3c"]
    parents = {}
    if a.mf_package:
        parents["multifidelity"] = str(Path(a.mf_package).resolve())
    else:
        parents["multifidelity"] = run("foundation.yaml", base + [f"trainer.steps={a.pretrain_steps}",
                                                                  f"output={work / 'pretrain_mf'}"] + a.set)["package"]
    steps = max(1, a.pretrain_steps // k)
    parents["reptile"] = run("foundation.yaml", base + [
        "trainer.mode=reptile", f"trainer.steps={steps}", f"trainer.checkpoint_every={max(1, steps // 20)}",
        f"trainer.valid_every={max(1, steps // 12)}", f"output={work / 'pretrain_reptile'}"] + a.set)["package"]
    return parents


def finetune(a, parents: dict[str, str], target: dict[str, str], work: Path, seed: int) -> list[dict]:
    """Each parent without and with replay, and the scratch run, on the target; their summaries."""
    from polyfid.distributed.config import load_config
    from polyfid.distributed.finetune.scratch import scratch_config
    from polyfid.distributed.driver.launcher import run_training
    from polyfid.models.package import read_metadata

    common = [f"data.train={target['train']}", f"data.valid={target['valid']}", f"finetune.head={HIGH}",
              f"trainer.seed={seed}", "tracking.register_as=null", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
              "tracking.experiment=s3c"] + a.ft_set
    rows = []
    for mode, parent in parents.items():
        for replay in (0.0, a.replay):
            out = work / f"seed{seed}" / f"ft_{mode}_replay{replay:g}"
            s = run("finetune.yaml", [f"finetune.source={parent}", f"finetune.replay_fraction={replay}",
                                      f"output={out}"] + common)
            rows.append({"pretraining": mode, "replay": replay, "seed": seed, "summary": s})
    cfg = load_config(RECIPES / "finetune.yaml", [f"finetune.source={parents['multifidelity']}",
                                                  f"output={work / f'seed{seed}' / 'none'}"] + common)
    sc = scratch_config(cfg, read_metadata(parents["multifidelity"]))
    sc.output = str(work / f"seed{seed}" / "none")
    s = finished(Path(sc.output)) or run_training(sc, shutdown_ray=False)
    rows.append({"pretraining": "none", "replay": None, "seed": seed, "summary": s})
    return rows


def scan_metrics(package: str, files: Path, work: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """The fine-tuned head on the target's bond and torsion scans against the wB97X reference: the metrics and
    the curves (x, model and reference energies, eV), per scan."""
    from polyfid.evaluation.pes import ScanResult, as_calculator, energies
    from polyfid.models.package import load_package

    frames = read_frames(files, TARGET, "scans", work / "tmp")
    calc = as_calculator(load_package(package), HIGH)
    out, curves = {}, {}
    for kind in ("bond", "torsion"):
        geoms = sorted((f for f in frames if f.info["sampler"] == f"scan_{kind}" and f"energy_{HIGH}" in f.info),
                       key=lambda f: f.info["scan_value"])
        x = np.array([f.info["scan_value"] for f in geoms])
        ref = np.array([f.info[f"energy_{HIGH}"] for f in geoms])
        e = energies(calc, geoms)
        out[kind] = ScanResult(kind, (), x, e, HIGH, ref, HIGH).metrics()
        curves[kind] = {"x": x.tolist(), "energy": np.asarray(e).tolist(), "reference": ref.tolist()}
    return out, curves


def plot_scans(rows: list[dict], path: Path) -> Path:
    """Each pretraining's fine-tuned model (first seed, each replay) on the bond and torsion scans, against the
    wB97X reference; energies relative to each curve's minimum."""
    from polyfid.evaluation.plots import pyplot, save_figure

    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4))
    seed = min(r["seed"] for r in rows)
    for ax, kind in zip(axes, ("bond", "torsion")):
        ref = rows[0]["scan_curves"][kind]
        x = np.array(ref["x"])
        ax.plot(x, (np.array(ref["reference"]) - min(ref["reference"])) * 1e3, "k--", lw=1.5, label="wB97X/6-31G*")
        for r in (r for r in rows if r["seed"] == seed):
            e = np.array(r["scan_curves"][kind]["energy"])
            name = r["pretraining"] + ("" if r["replay"] is None else f", replay {r['replay']:g}")
            ax.plot(x, (e - e.min()) * 1e3, "o-", ms=3, lw=1, label=name)
        ax.set_xlabel("O-H distance (Å)" if kind == "bond" else "amide torsion (deg)")
        ax.set_ylabel("E - E_min (meV)")
        ax.set_title(f"paracetamol {kind} scan, fine-tuned (seed {seed})", fontsize=9)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    return save_figure(fig, path)


def _mean(rows: list[dict], key) -> float:
    return float(np.mean([key(r) for r in rows]))


def report(rows: list[dict], a, wall: float, argv: list[str]) -> str:
    """Markdown: per (pretraining, replay) means over seeds; scans; forgetting; the goal's ratios."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["pretraining"], r["replay"]), []).append(r)
    lines = ["# S3 at corpus scale: pretraining mode -> fine-tuning to paracetamol at wB97X/6-31G*", "",
             f"Command: `python benchmarks/bench_s3_corpus.py {' '.join(argv)}`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU. Wall time {wall / 60:.1f} min. "
             f"Fine-tuning seeds {a.seeds}; {a.target_n} target structures; pretraining {a.pretrain_steps} "
             "gradient steps each.", "",
             "| pretraining | replay | seeds | test E MAE (meV) | test F MAE (meV/Å) | bond scan MAE (meV) | bond spurious "
             "extrema | bond roughness (ref) | torsion scan MAE (meV) | torsion spurious extrema |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (mode, replay), rs in groups.items():
        b = lambda k: _mean(rs, lambda r: r["scans"]["bond"][k])  # noqa: E731
        t = lambda k: _mean(rs, lambda r: r["scans"]["torsion"][k])  # noqa: E731
        lines.append(f"| {mode} | {'-' if replay is None else f'{replay:g}'} | {len(rs)} | "
                     f"{_mean(rs, lambda r: r['test']['energy_mae']) * 1e3:.1f} | "
                     f"{_mean(rs, lambda r: r['test']['forces_mae']) * 1e3:.1f} | {b('mae_offset_ev') * 1e3:.1f} | "
                     f"{b('spurious_extrema'):+.1f} | {b('roughness'):.3g} ({b('roughness_ref'):.3g}) | "
                     f"{t('mae_offset_ev') * 1e3:.1f} | {t('spurious_extrema'):+.1f} |")
    lines += ["", "## Forgetting on the pretraining levels (parent -> fine-tuned, on the parent's validation stores; "
              "mean over seeds)", "", "| pretraining | replay | head | E MAE (meV) | F MAE (meV/Å) |", "|---|---|---|---|---|"]
    for (mode, replay), rs in groups.items():
        for fid in sorted((rs[0]["summary"].get("forgetting") or {})):
            f = lambda k: _mean(rs, lambda r: r["summary"]["forgetting"][fid][k]) * 1e3  # noqa: E731
            lines.append(f"| {mode} | {replay:g} | {fid} | {f('energy_mae_parent'):.1f} -> {f('energy_mae_finetuned'):.1f}"
                         f" | {f('forces_mae_parent'):.1f} -> {f('forces_mae_finetuned'):.1f} |")
    none = _mean(groups[("none", None)], lambda r: r["test"]["forces_mae"])
    best = {m: min(_mean(groups[(m, rp)], lambda r: r["test"]["forces_mae"]) for rp in (0.0, a.replay))
            for m in ("multifidelity", "reptile")}
    lines += ["", f"- Best pretraining / none, test F MAE: {min(best.values()) / none:.2f} (goal <= 0.6); "
              f"multi-fidelity {best['multifidelity'] / none:.2f}, Reptile {best['reptile'] / none:.2f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("runs/s3c"))
    ap.add_argument("--stores", type=Path, default=Path("runs/corpus"), help="corpus stores (made if empty)")
    ap.add_argument("--files", type=Path, default=None, help="corpus extxyz folder (default: the committed one)")
    ap.add_argument("--pretrain-steps", type=int, default=12000)
    ap.add_argument("--mf-package", default=None, help="a multi-fidelity package with the same recipe and steps")
    ap.add_argument("--target-n", type=int, default=50)
    ap.add_argument("--replay", type=float, default=0.25)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="pretraining override")
    ap.add_argument("--ft-set", action="append", default=[], metavar="KEY=VALUE", help="fine-tuning override")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="the scan figure (default: WORKDIR/s3_corpus_scans.png)")
    a = ap.parse_args(argv)

    from polyfid.data_shards.corpus.stores import FILES
    from polyfid.distributed.finetune.scratch import compare_table
    from polyfid.launch.foundation import corpus_stores

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "polyfid" / "torch_extensions"))
    t0 = time.perf_counter()
    work = a.workdir.resolve()
    files = a.files or FILES
    stores = {lv: s for lv, s in corpus_stores(a.stores, a.files).items()}
    target = target_stores(files, work, a.target_n)
    parents = pretrain(a, stores, work)
    rows = [r for seed in a.seeds.split(",") if seed for r in finetune(a, parents, target, work, int(seed))]
    for r in rows:
        pkg = r["summary"]["package"]
        r["test"] = compare_table({"m": pkg}, [target["test"]])["m"][HIGH]
        r["scans"], r["scan_curves"] = scan_metrics(pkg, files, work)
    text = report(rows, a, time.perf_counter() - t0, argv)
    print(text)
    (work / "results.json").write_text(json.dumps(rows, indent=2, default=str))
    if a.out:
        a.out.write_text(text)
    print("figure:", plot_scans(rows, a.plot or work / "s3_corpus_scans.png"))
    import ray

    if ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    main()
