"""S1 at corpus scale: do GFN2-xTB forces plus wB97X energies reach a model trained on wB97X forces?

    python benchmarks/bench_s1_corpus.py --workdir runs/s1c --steps 1000 --seeds 0,1,2 --curve 300,all \
        --oversample 0.25 --force-prior 0,0.1 --out benchmarks/RESULTS_s1_corpus.md

Data: the pretraining corpus (`data_shards/corpus/`), its training molecules' train split for training, its
test split and its held-out molecules for the errors. The same model, recipe (`launch/recipes/foundation.yaml`),
steps and seeds for every variant:
- (a) wB97X energies only, on every training structure that has one;
- (b) wB97X energies and forces, on the training structures that have wB97X forces;
- (c) GFN2-xTB energies and forces on every GFN2 training structure, plus wB97X energies, two stores, two heads.
  `--curve` gives the numbers of wB97X energies (nested random subsets, numpy seed 0, fixed across training
  seeds; `all`); `--oversample` the wB97X store's share of each batch; `--force-prior` the weight with which the
  wB97X head also fits the GFN2 forces where it has none (loss.force_prior; 0: off);
- (c=) like (c), with as many wB97X energies as cost the DFT CPU time of (b)'s labels. The CPU seconds are the
  generator's own, per label: (b)'s forces labels against the mean of the energy-only labels.
Every run goes through the real path (run_training -> Ray Train -> DeepSpeed -> package). A run whose result
exists in the workdir is reused, so a sweep can be extended or resumed; --fresh retrains.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from polyfid.data_shards.named import open_store

RECIPE = Path(__file__).resolve().parents[1] / "launch" / "recipes" / "foundation.yaml"


def read_frames(files: Path, level: str, split: str, tmp: Path) -> list:
    """The frames of one corpus file (gunzipped first: ASE's reader seeks, and gzip re-inflates on each seek)."""
    import ase.io

    plain = tmp / f"{level}_{split}.extxyz"
    if not plain.exists():
        plain.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(files / f"{level}_{split}.extxyz.gz", "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return list(ase.io.iread(str(plain), format="extxyz"))


def label_cpu(frames: list, level: str, root: Path) -> np.ndarray:
    """CPU seconds the generator spent on each frame's label at `level` (NaN where it has no record)."""
    from polyfid.datasets.corpus.store import LabelStore, label_key, quantise, structure_hash

    labels = LabelStore(root, level)
    out = []
    for atoms in frames:
        rec = labels.get(label_key(structure_hash(atoms.numbers, quantise(atoms.positions)), level))
        out.append(rec.cpu_s if rec is not None else np.nan)
    return np.asarray(out, dtype=np.float64)


def write_store(frames: list, path: Path, level: str, forces: bool) -> str:
    """A store of `frames` with `level`'s energies (and forces when asked), made once."""
    import ase.io

    from polyfid.data_shards.corpus.levels import LEVELS
    from polyfid.data_shards.ingest import ingest

    if not path.exists():
        xyz = path.with_suffix(".extxyz")
        xyz.parent.mkdir(parents=True, exist_ok=True)
        ase.io.write(str(xyz), frames, format="extxyz")
        meta = {lv.name: lv.meta() for lv in LEVELS if lv.name == level}
        ingest([str(xyz)], str(path), dataset=f"s1_{path.stem}", energy={level: f"energy_{level}"},
               forces={level: f"forces_{level}"} if forces else {}, fidelity_meta=meta, progress=False)
        xyz.unlink()
    return str(path)


def plan_variants(a: argparse.Namespace, work: Path, stores: dict) -> tuple[dict[str, dict], dict]:
    """name -> {stores, labels, dft_cpu_s}; and facts about the high level's training labels."""
    from polyfid.data_shards.corpus.stores import FILES

    files = Path(a.files) if a.files else FILES
    frames = [f for f in read_frames(files, a.high, "train", work / "tmp") if f"energy_{a.high}" in f.info]
    cpu = label_cpu(frames, a.high, files.parent) if not a.files else np.full(len(frames), np.nan)
    has_f = np.array([f"forces_{a.high}" in f.arrays for f in frames])
    e_only_cpu = float(np.nanmean(cpu[~has_f])) if (~has_f).any() else float("nan")
    sd = work / "stores"
    variants = {"a": {"stores": [write_store(frames, sd / "a.zarr", a.high, False)],
                      "labels": f"{a.high} E on {len(frames):,}", "dft_cpu_s": float(np.nansum(cpu))},
                "b": {"stores": [write_store([f for f, k in zip(frames, has_f) if k], sd / "b.zarr", a.high, True)],
                      "labels": f"{a.high} E+F on {int(has_f.sum()):,}", "dft_cpu_s": float(np.nansum(cpu[has_f]))}}
    counts = [len(frames) if c == "all" else min(int(c), len(frames)) for c in a.curve.split(",") if c]
    if a.equal_compute and np.isfinite(e_only_cpu) and e_only_cpu > 0:
        counts.append(-int(variants["b"]["dft_cpu_s"] // e_only_cpu))  # negative: the equal-compute point
    # The (c) subsets: nested prefixes of one random order (seed 0, the same for every training seed). The corpus
    # files list structures molecule by molecule, so their own order would leave whole elements out of a prefix.
    shuffled = [frames[i] for i in np.random.default_rng(0).permutation(len(frames))]
    for n in counts:
        k = min(abs(n), len(frames))
        high = write_store(shuffled[:k], sd / f"c{k}.zarr", a.high, False)
        for f, w in ((f, w) for f in a.oversample for w in a.force_prior):
            name = (f"c{k}" if n > 0 else "c=") + (f"os{f:g}" if f else "") + (f"fp{w:g}" if w else "")
            variants[name] = {"stores": [stores[a.low]["train"], high],
                              "labels": f"{a.low} E+F on {n_structures(stores[a.low]['train']):,}, {a.high} E on "
                              f"{k:,}" + (" (= DFT CPU of b)" if n < 0 else "")
                              + (f", oversampled to {f:.0%} of each batch" if f else "")
                              + (f", force prior {w:g}" if w else ""),
                              "dft_cpu_s": k * e_only_cpu,
                              # by size with f = 0 (the recipe's default is oversample=top)
                              "sets": ([f"data.oversample={high}", f"data.oversample_fraction={f}"] if f
                                       else ["data.oversample="])
                              + ([f"loss.force_prior={{{a.high}: {a.low}}}", f"loss.force_prior_weight={w}"] if w
                                 else ["loss.force_prior="])}
    facts = {"train_structures": len(frames), "with_forces": int(has_f.sum()),
             "cpu_s_per_energy_label": e_only_cpu,
             "cpu_s_per_forces_label": float(np.nanmean(cpu[has_f])) if has_f.any() else float("nan")}
    return variants, facts


def n_structures(path: str) -> int:
    """Structures in a store."""

    return open_store(path).n_structures


def train(name: str, spec: dict, seed: int, a: argparse.Namespace, work: Path, tests: dict[str, str]) -> dict | None:
    """Train (or reuse) one run; its errors on each test store at the high level (meV, meV/Å). None: not run
    (--no-train)."""
    from polyfid.distributed.config import load_config
    from polyfid.distributed.driver.launcher import run_training
    from polyfid.launch.demo import s1_errors

    out = work / "runs" / f"{name}_s{seed}_n{a.steps}"
    record = out / "s1.json"
    if record.exists() and not a.fresh:
        return json.loads(record.read_text())
    if not a.train:
        return None
    shutil.rmtree(out, ignore_errors=True)
    sets = [f"data.train={','.join(spec['stores'])}", f"output={out}", "tracking.enabled=false",
            f"trainer.steps={a.steps}", f"trainer.seed={seed}", f"cluster.workers={a.workers}",
            f"trainer.checkpoint_every={max(a.steps // 4, 1)}", f"trainer.valid_every={a.steps + 1}"] + a.set \
        + spec.get("sets", [])
    t = time.perf_counter()
    summary = run_training(load_config(RECIPE, sets))
    res = {split: s1_errors(summary["package"], store, a.high) for split, store in tests.items()}
    res.update(wall_s=time.perf_counter() - t, sets=sets)
    record.write_text(json.dumps(res, indent=2))
    print(f"  {name} seed {seed}: " + "; ".join(f"{s} E {r['energy_mae']:.1f} meV, F {r['forces_mae']:.1f} meV/Å"
                                               for s, r in res.items() if isinstance(r, dict))
          + f" ({res['wall_s']:.0f} s)", flush=True)
    return res


def low_head_forces(run: dict, package: Path, frames: dict[str, list], low: str, high: str) -> dict:
    """Adds to a (c) run's record each split's high-level force MAE of the package's *low* head ({split}:
    low_head_forces_mae, meV/Å) beside its high head's: does training the high head on energies improve on the
    low level's forces? The structures are those with high-level forces."""
    from polyfid.models.calculator import Calculator

    calc = Calculator(str(package), fidelity=low)
    for split, atoms in frames.items():
        err = []
        for ref in atoms:
            a = ref.copy()
            a.calc = calc
            err.append(np.abs(a.get_forces() - ref.arrays[f"forces_{high}"]).ravel())
        run[split]["low_head_forces_mae"] = 1000.0 * float(np.mean(np.concatenate(err)))
    return run


def add_low_heads(rows: dict[str, dict], splits: list[str], a: argparse.Namespace, work: Path) -> None:
    """low_head_forces for every (c) run that lacks it; the run's record is rewritten with it."""
    from polyfid.data_shards.corpus.stores import FILES

    files = Path(a.files) if a.files else FILES
    frames = None
    for r in (r for r in rows.values() if len(r["stores"]) == 2):
        for run in r["runs"]:
            if all("low_head_forces_mae" in run[s] for s in splits):
                continue
            if frames is None:
                frames = {s: [f for f in read_frames(files, a.high, s, work / "tmp") if f"forces_{a.high}" in f.arrays]
                          for s in splits}
            out = Path(next(x.split("=", 1)[1] for x in run["sets"] if x.startswith("output=")))
            (out / "s1.json").write_text(json.dumps(low_head_forces(run, out / "package", frames, a.low, a.high),
                                                    indent=2))


def head_table(rows: dict[str, dict], splits: list[str], low: str) -> str:
    """Markdown: for the (c) rows, the high-level force MAE of the high head and of the low head."""
    lines = [f"| variant | " + " | ".join(f"{s}: high head | {s}: {low} head" for s in splits) + " |",
             "|" + "---|" * (1 + 2 * len(splits))]
    for name, r in rows.items():
        if all("low_head_forces_mae" in run.get(splits[0], {}) for run in r["runs"]):
            lines.append(f"| ({name}) | " + " | ".join(
                f"{_stat([run[s]['forces_mae'] for run in r['runs']])} | "
                f"{_stat([run[s]['low_head_forces_mae'] for run in r['runs']])}" for s in splits) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _curve_point(name: str) -> int | None:
    """The number of high-level energies of a (c) curve row (c300, c729os0.25), None for other rows."""
    m = re.match(r"c(\d+)", name)
    return int(m.group(1)) if m else None


def _stat(xs: list[float]) -> str:
    return f"{xs[0]:.1f}" if len(xs) == 1 else f"{np.mean(xs):.1f} ± {np.std(xs, ddof=1):.1f}"


def format_table(rows: dict[str, dict], splits: list[str]) -> str:
    """Markdown, one row per variant: labels, DFT CPU hours, seeds, E and F MAE on each split (mean ± std)."""
    head = "| variant | training labels | DFT CPU h | seeds | " + " | ".join(
        f"{s} E MAE (meV) | {s} F MAE (meV/Å)" for s in splits) + " |"
    lines = [head, "|" + "---|" * (4 + 2 * len(splits))]
    for name, r in rows.items():
        cols = [_stat([run[s][k] for run in r["runs"]]) for s in splits for k in ("energy_mae", "forces_mae")]
        lines.append(f"| ({name}) | {r['labels']} | {r['dft_cpu_s'] / 3600:.2f} | {len(r['runs'])} | "
                     + " | ".join(cols) + " |")
    return "\n".join(lines)


def _curves(rows: dict[str, dict]) -> dict[str, list[str]]:
    """The (c) curve rows by their oversampling suffix ("" or "os0.25"), each sorted by its number of energies."""
    out: dict[str, list[str]] = {}
    for k in sorted((k for k in rows if _curve_point(k) is not None), key=_curve_point):
        out.setdefault(k[len(f"c{_curve_point(k)}"):], []).append(k)
    return out


def ratios(rows: dict[str, dict], split: str) -> list[str]:
    """The goal's ratios on forces: (c, all energies) / (b) and / (a), for each oversampling of (c)."""
    def f(name: str) -> float:
        return float(np.mean([run[split]["forces_mae"] for run in rows[name]["runs"]]))

    if "a" not in rows or "b" not in rows:
        return []
    return [f"{split}: F MAE ({cs[-1]}) / (b) = {f(cs[-1]) / f('b'):.3f} (goal <= 1.25), ({cs[-1]}) / (a) = "
            f"{f(cs[-1]) / f('a'):.3f} (goal <= 0.5)" for cs in _curves(rows).values()]


def plot_rows(rows: dict[str, dict], splits: list[str], path: Path) -> Path:
    """Force and energy MAE against the DFT CPU hours of each variant's labels (mean and std over seeds): the
    (c) curves as lines (one style per oversampling), (a), (b) and (c=) as labelled points; one colour per split."""
    from polyfid.evaluation.plots import pyplot, save_figure

    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4))
    for ax, key, unit in zip(axes, ("forces_mae", "energy_mae"), ("meV/Å", "meV")):
        for i, split in enumerate(splits):
            def stat(name: str) -> tuple[float, float, float]:
                xs = [run[split][key] for run in rows[name]["runs"]]
                return rows[name]["dft_cpu_s"] / 3600, float(np.mean(xs)), float(np.std(xs))

            colour = f"C{i}"
            for (suffix, cs), style in zip(_curves(rows).items(), ("-", "--", ":", "-.")):
                pts = np.array([stat(c) for c in cs])
                ax.errorbar(pts[:, 0], pts[:, 1], pts[:, 2], color=colour, marker="o", capsize=3, linestyle=style,
                            label=f"(c{', ' + suffix if suffix else ''}) {split}")
            for name, marker in (("a", "s"), ("b", "^")) + tuple((k, "D") for k in rows if k.startswith("c=")):
                if name in rows:
                    x, y, e = stat(name)
                    ax.errorbar([x], [y], [e], color=colour, marker=marker, capsize=3, linestyle="none")
                    ax.annotate(f"({name})", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("DFT CPU hours of the training labels")
        ax.set_ylabel(f"{key.replace('_mae', '')} MAE ({unit})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("S1: GFN2-xTB E+F plus wB97X energies (c) against wB97X labels alone (a: E, b: E+F)")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/s1c")
    p.add_argument("--stores", default="runs/corpus", help="the corpus stores (made from the files if empty)")
    p.add_argument("--files", default=None, help="corpus extxyz folder (default: data_shards/corpus/extxyz); "
                   "another folder has no CPU-time records, so no equal-compute point")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--high", default="wb97x_631gs")
    p.add_argument("--low", default="gfn2_xtb")
    p.add_argument("--curve", default="300,1000,all", help="numbers of high-level energies in (c); `all`")
    p.add_argument("--no-equal-compute", dest="equal_compute", action="store_false")
    p.add_argument("--oversample", type=lambda v: [float(x) for x in v.split(",")], default=[0.0],
                   help="(c): the high-level store's share of each batch's atoms (data.oversample), one (c) row per "
                   "comma-separated value; 0: its share by size. Names the (c) rows c...os<F>")
    p.add_argument("--force-prior", type=lambda v: [float(x) for x in v.split(",")], default=[0.3],
                   help="(c): loss.force_prior_weight of the high head on the low level's forces where it has none "
                   "(loss.force_prior), one (c) row per comma-separated value; 0: no prior. Names the (c) rows "
                   "c...fp<W>")
    p.add_argument("--no-train", dest="train", action="store_false", help="only tabulate the runs that exist in the "
                   "workdir (a variant's seeds that did not run are left out of its row)")
    p.add_argument("--variants", default="", help="only these (comma-separated names, e.g. a,b,c300); default all")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--out", default=None, help="also write the tables as markdown here")
    p.add_argument("--plot", default=None, help="the figure (default: WORKDIR/s1_corpus.png)")
    a = p.parse_args(argv)

    from polyfid.launch.foundation import corpus_stores

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "polyfid" / "torch_extensions"))
    work = Path(a.workdir).resolve()
    t0 = time.perf_counter()
    stores = corpus_stores(Path(a.stores), Path(a.files) if a.files else None)
    tests = {s: stores[a.high][s] for s in ("test", "heldout") if s in stores.get(a.high, {})}
    variants, facts = plan_variants(a, work, stores)
    only = [v for v in a.variants.split(",") if v]
    rows = {}
    for name, spec in variants.items():
        if only and name not in only:
            continue
        runs = [r for r in (train(name, spec, int(s), a, work, tests) for s in a.seeds.split(",") if s) if r]
        if runs:
            rows[name] = {**spec, "runs": runs}
    splits = list(tests)
    add_low_heads(rows, splits, a, work)
    table = format_table(rows, splits)
    lines = [f"S1 at corpus scale: {a.high} errors, {a.steps} steps, {a.workers} workers, seeds {a.seeds}", "",
             table, ""] + [f"- {r}" for s in splits for r in ratios(rows, s)]
    heads = head_table(rows, splits, a.low)
    if heads:
        lines += ["", f"{a.high} force MAE (meV/Å) of the (c) models' two heads, on the structures with {a.high} "
                  "forces:", "", heads]
    text = "\n".join(lines)
    print("\n" + text)
    out = {"command": "python benchmarks/bench_s1_corpus.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
           "facts": facts, "rows": rows, "table": text, "wall_s": time.perf_counter() - t0}
    (work / "s1_corpus.json").write_text(json.dumps(out, indent=2))
    print("figure:", plot_rows(rows, splits, Path(a.plot) if a.plot else work / "s1_corpus.png"))
    if a.out:
        Path(a.out).write_text(f"# S1 at corpus scale\n\nCommand: `{out['command']}`\n\nMachine: {out['machine']}\n\n"
                               f"Facts: {json.dumps(facts)}\n\n{text}\n")
    import ray

    if ray.is_initialized():
        ray.shutdown()
    return out


if __name__ == "__main__":
    main()
