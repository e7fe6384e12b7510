"""`polyfid demo`: the whole path on the embedded QM data, in one command.

ingest -> multi-fidelity pretraining (Ray Train, 2 DeepSpeed workers) -> MLflow + registry -> fine-tune from the
registry -> register the shipped checkpoint (pretrained:organic-mini) and fine-tune it the same way -> evaluate
-> tables of errors per fidelity, and the comparison of the two fine-tuned models. `--s1` adds S1's baselines.

The pretraining data follow S1 (variant c): low-level (GFN2-xTB) energies and forces on every frame,
high-level (B3LYP/6-31G*) energies on a subset (S1_FRACTION) and no high-level forces. The held-out frames
carry forces at both levels, so the table shows how well high-level forces are learned without any
high-level force label. S1's baselines train the same model for the same steps on (a) high-level energies
only and (b) high-level energies and forces; `benchmarks/bench_s1.py` runs them over seeds. The fine-tuning
target is a molecule the pretraining never saw (formic acid), with 50 high-level frames.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from polyfid.data_shards.demo import EXTRA, HIGH, LOW, demo_files
from polyfid.data_shards.ingest import ingest
from polyfid.data_shards.named import open_store

RECIPES = Path(__file__).parent / "recipes"
TARGET = "formic_acid"
N_VALID = 20  # last frames of each pretraining molecule
N_TARGET_TRAIN = 50
N_TARGET_VALID = 20  # the frames after the training frames: early stopping and best weights; the rest is test
FINETUNE_STEPS = 600  # the demo's fine-tuning budget (the recipe's is 3,000 steps), to keep the demo short
SHIPPED_MODEL = "organic-mini"  # the shipped checkpoint the demo also fine-tunes (pretrained:NAME)
S1_FRACTION = 0.5  # share of the pretraining frames with a high-level energy (S1 variant c); 1/k for whole k
RANKS = {LOW: 0, HIGH: 1, EXTRA: 2}
META = {LOW: {"method": "GFN2-xTB", "code": "tblite"}, HIGH: {"method": "B3LYP", "basis": "6-31G*", "code": "PySCF"},
        EXTRA: {"method": "wB97X", "basis": "6-31G*", "code": "PySCF"}}
# S1 variants: what the training store of each holds (frames :-N_VALID of each pretraining molecule)
S1_VARIANTS = {
    "a": "high-level energies only",
    "b": "high-level energies and forces",
    "c": "low-level energies and forces + high-level energies on a subset",
}


def _section(title: str) -> float:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)
    return time.perf_counter()


def subset_step(fraction: float) -> int:
    """Every k-th frame carries a high-level energy: k = 1/fraction, which must be a whole number."""
    k = round(1.0 / fraction) if fraction > 0 else 0
    if k < 1 or abs(k * fraction - 1.0) > 1e-6:
        raise ValueError(f"the high-level subset must be 1/k of the frames (1, 0.5, 0.25, ...), got {fraction}")
    return k


def ingest_levels(spec: str, out: str, dataset: str, energy: list[str], forces: list[str], **kw) -> None:
    """Ingest `spec` into `out` with the energies and forces of the named levels (the demo files' key names)."""
    used = set(energy) | set(forces)
    ingest([spec], out, dataset=dataset, energy={f: f"energy_{f}" for f in energy},
           forces={f: f"forces_{f}" for f in forces}, ranks={f: r for f, r in RANKS.items() if f in used},
           fidelity_meta={f: m for f, m in META.items() if f in used}, progress=False, **kw)


def ingest_train(spec: str, out: str, dataset: str, variant: str, fraction: float = 1.0, append: bool = False,
                 low: str = LOW, high: str = HIGH) -> None:
    """Append one molecule's training frames (`spec`, e.g. file@:-20) to store `out` as S1 variant a, b or c."""

    def run(inp: str, energy: list[str], forces: list[str], **kw) -> None:
        ingest_levels(inp, out, dataset, energy, forces, shard_size=40, **kw)

    if variant in ("a", "b"):
        run(spec, [high], [high] if variant == "b" else [], append=append)
        return
    if variant != "c":
        raise ValueError(f"S1 variant must be a, b or c, got {variant!r}")
    k = subset_step(fraction)
    if k == 1:
        run(spec, [low, high], [low], append=append)
        return
    # low-level labels on every frame, then the high-level energies of every k-th frame merged into those rows
    run(spec, [low], [low], append=append)
    path, sl = spec.rsplit("@", 1)
    start, stop = (sl.split(":") + [""])[:2]
    run(f"{path}@{start}:{stop}:{k}", [high], [], append=True, merge_on="geometry")


def _files() -> tuple[dict[str, Path], list[str]]:
    """The demo files by molecule, and the pretraining molecules (all but the target)."""
    files = {p.name.split(".")[0]: p for p in demo_files()}
    if TARGET not in files or len(files) < 2:
        raise FileNotFoundError(f"the embedded demo data is incomplete: found {sorted(files)}")
    return files, [n for n in sorted(files) if n != TARGET]


def ingest_variant(out: str, variant: str, fraction: float = S1_FRACTION, molecules: list[str] | None = None,
                   low: str = LOW, high: str = HIGH) -> str:
    """The S1 training store of `variant` (a, b or c) over frames :-N_VALID of the molecules (default: pretraining)."""
    files, pretrain = _files()
    for i, name in enumerate(molecules or pretrain):
        ingest_train(f"{files[name]}@:-{N_VALID}", out, name, variant, fraction, append=i > 0, low=low, high=high)
    return out


def ingest_heldout(out: str, molecules: list[str] | None = None, levels: tuple[str, ...] = (LOW, HIGH)) -> str:
    """The S1 test split: the last N_VALID frames of each molecule (default: pretraining), with energies and
    forces at every level in `levels`."""
    files, pretrain = _files()
    for i, name in enumerate(molecules or pretrain):
        ingest_levels(f"{files[name]}@-{N_VALID}:", out, name, list(levels), list(levels), append=i > 0)
    return out


def ingest_demo(workdir: Path, fraction: float = S1_FRACTION, variants: tuple[str, ...] = ("c",)) -> dict[str, str]:
    """Write the demo stores; returns their paths.

    "pretrain" is S1 variant c (`fraction` of the frames with high-level energies); "s1_a" and "s1_b" are
    variants a and b on the same frames when asked for; "valid" (the S1 test split) has all labels.
    """
    files, _ = _files()
    names = {"c": "pretrain", "a": "s1_a", "b": "s1_b"}
    stores = {k: str(workdir / "stores" / f"{k}.zarr")
              for k in [names[v] for v in variants] + ["valid", "target", "target_valid", "target_test"]}
    for v in variants:
        ingest_variant(stores[names[v]], v, fraction)
    ingest_heldout(stores["valid"])
    t = files[TARGET]
    ingest_levels(f"{t}@:{N_TARGET_TRAIN}", stores["target"], TARGET, [HIGH], [HIGH])
    ingest_levels(f"{t}@{N_TARGET_TRAIN}:{N_TARGET_TRAIN + N_TARGET_VALID}", stores["target_valid"], TARGET, [HIGH],
                  [HIGH])
    ingest_levels(f"{t}@{N_TARGET_TRAIN + N_TARGET_VALID}:", stores["target_test"], TARGET, [HIGH], [HIGH])
    from polyfid.data_shards.inspect import summarize

    for k, p in stores.items():
        s = open_store(p)
        cov = summarize(s)["coverage"]
        labels = "; ".join(f"{f} E {c['energy']} F {c['forces']}" for f, c in cov.items())
        print(f"  {k:<12} {s.n_structures:>4} structures {s.n_atoms:>5} atoms  labels {labels}  ({p})")
    return stores


def evaluate(package: str, store: str, refit_on: str | None = None, anchor: str | None = None) -> dict:
    """Errors of a package on a store, per fidelity; `refit_on` first refits the head's references there,
    anchored on store `anchor` (the pretraining data), as `polyfid finetune` does before step 0."""
    from polyfid.data_shards.reader import iter_all
    from polyfid.evaluation.metrics import evaluate_batches
    from polyfid.distributed.finetune.plan import refit_references
    from polyfid.models.package import load_package

    s = open_store(store)
    fids = [f.name for f in s.fidelities]
    model = load_package(package)
    if refit_on:
        refit_references(model, HIGH, [open_store(refit_on)], anchors=[open_store(anchor)] if anchor else ())
    return evaluate_batches(model, iter_all([s], fidelities=fids), fids).results()


def s1_errors(package: str, test_store: str, high: str = HIGH) -> dict[str, float]:
    """High-level errors of a package on the S1 test split, in meV and meV/Å."""
    r = evaluate(package, test_store)[high]
    keys = ("energy_mae", "energy_rmse", "energy_mae_per_atom", "forces_mae", "forces_rmse")
    return {k: r[k] * 1000.0 for k in keys}


def train_s1(store: str, output: Path, sets: list[str]) -> dict:
    """Train one S1 variant on `store` with the demo recipe (tracking off, one checkpoint at the end)."""
    from polyfid.distributed.config import load_config
    from polyfid.distributed.driver.launcher import run_training

    cfg = load_config(RECIPES / "demo.yaml", list(sets) + [f"data.train={store}", f"output={output}",
                                                          "tracking.enabled=false"])
    cfg.trainer.checkpoint_every = cfg.trainer.steps
    return run_training(cfg)


def _stat(values: list[float]) -> str:
    import numpy as np

    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def format_s1_table(rows: list[dict]) -> str:
    """Markdown: one row per variant; `runs` holds one s1_errors dict per seed (mean ± sample std over seeds)."""
    lines = [f"| variant | training labels | heads | seeds | E MAE (meV) | E MAE/atom (meV) | F MAE (meV/Å) | F RMSE (meV/Å) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        runs = r["runs"]
        cols = [_stat([x[k] for x in runs]) for k in ("energy_mae", "energy_mae_per_atom", "forces_mae", "forces_rmse")]
        lines.append(f"| ({r['variant']}) | {r['labels']} | {r.get('heads', '-')} | {len(runs)} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def s1_labels(variant: str, fraction: float = S1_FRACTION, low: str = LOW, high: str = HIGH) -> str:
    """The training labels of a variant, in words."""
    if variant == "c":
        return f"{low} E+F, {high} E on {fraction:.0%}"
    return f"{high} E" + ("+F" if variant == "b" else "")


def finetune_target(source: str, stores: dict[str, str], out: Path, tracking: tuple[str, str],
                    sets: list[str]) -> dict:
    """Fine-tune `source` (a package, pretrained:NAME or MLflow URI) on the target's 50 frames (finetune recipe)."""
    from polyfid.distributed.driver.launcher import run_training

    return run_training(_finetune_config(source, stores, out, tracking, sets))


def _finetune_config(source: str, stores: dict[str, str], out: Path, tracking: tuple[str, str], sets: list[str]):
    from polyfid.distributed.config import load_config

    return load_config(RECIPES / "finetune.yaml", [
        f"finetune.source={source}", f"data.train={stores['target']}", f"data.valid={stores['target_valid']}",
        f"output={out}", f"tracking.uri={tracking[0]}", f"tracking.experiment={tracking[1]}",
        f"trainer.steps={FINETUNE_STEPS}"] + list(sets))


def scratch_target(name: str, stores: dict[str, str], workdir: Path, tracking: tuple[str, str],
                   sets: list[str]) -> dict | None:
    """The same target trained from a random init with the shipped model's architecture: the same recipe, budget,
    validation, energy refit and best-weights selection; the lr is the recipe's finetune.scratch_lr."""
    from polyfid.distributed.finetune.scratch import scratch_config
    from polyfid.distributed.driver.launcher import run_training
    from polyfid.models.package import UnknownModel, read_metadata

    try:
        meta = read_metadata(f"pretrained:{name}")
    except UnknownModel as e:
        print(f"  skipped: {e}")
        return None
    cfg = scratch_config(_finetune_config(f"pretrained:{name}", stores, workdir / "scratch", tracking, sets), meta)
    cfg.output = str(workdir / "scratch")
    cfg.tracking.register_as = None
    return run_training(cfg)


def shipped_finetune(name: str, stores: dict[str, str], workdir: Path, tracking: tuple[str, str],
                     sets: list[str]) -> dict | None:
    """Register the shipped checkpoint `pretrained:NAME` in the MLflow registry, then fine-tune it from there to
    the target; None (with a note) when this checkout has no such model. A new head for the target's level
    starts from the shipped model's highest-rank head."""
    from polyfid.data_shards.schema import Fidelity, highest_rank
    from polyfid.infra.tracking import register_package
    from polyfid.models.package import UnknownModel, read_metadata

    try:
        meta = read_metadata(f"pretrained:{name}")
    except UnknownModel as e:
        print(f"  skipped: {e}")
        return None
    top = highest_rank([Fidelity.from_dict(f) for f in meta["fidelities"]]).name
    run_id, version = register_package(f"pretrained:{name}", f"polyfid-{name}", tracking[0])
    print(f"  registered pretrained:{name} as models:/polyfid-{name}/{version} (MLflow run {run_id})")
    source = f"models:/polyfid-{name}/{version}"
    ft = finetune_target(source, stores, workdir / f"finetune_{name}", tracking, [f"finetune.init_from={top}"] + sets)
    ft["source"] = source
    return ft


def format_finetune_compare(rows: dict[str, dict], fid: str = HIGH) -> str:
    """Markdown: the target's test errors at `fid` of each fine-tuned model (meV, meV/Å)."""
    lines = [f"| fine-tuned from | E MAE (meV) | E MAE/atom (meV) | F MAE (meV/Å) | F RMSE (meV/Å) |",
             "|---|---|---|---|---|"]
    for label, res in rows.items():
        r = res[fid]
        lines.append(f"| {label} | " + " | ".join(f"{r[k] * 1000:.1f}" for k in (
            "energy_mae", "energy_mae_per_atom", "forces_mae", "forces_rmse")) + " |")
    return "\n".join(lines)


def run_demo(workdir: Path, steps: int | None = None, workers: int = 2, overrides: list[str] | None = None,
             s1: bool = False, shipped: str | None = SHIPPED_MODEL) -> dict:
    """Run the whole demo in `workdir` (wiped first); returns the error tables. `s1`: also train S1's (a), (b);
    `shipped`: also fine-tune that shipped checkpoint (pretrained:NAME) to the target (None: don't)."""
    from polyfid.distributed.driver.launcher import one_ray_cluster

    with one_ray_cluster():  # the demo's trainings share one local Ray cluster
        return _run_demo(workdir, steps, workers, overrides, s1, shipped)


def _run_demo(workdir: Path, steps: int | None, workers: int, overrides: list[str] | None, s1: bool,
              shipped: str | None) -> dict:
    from polyfid.distributed.config import load_config
    from polyfid.distributed.driver.launcher import run_training

    t_start = time.perf_counter()
    workdir = Path(workdir).resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    n = 5 + bool(s1) + 2 * bool(shipped)
    step = iter(range(1, n + 1))

    t = _section(f"{next(step)}/{n} ingest the embedded QM data into zarr stores")
    stores = ingest_demo(workdir, variants=("c", "a", "b") if s1 else ("c",))
    print(f"  ({time.perf_counter() - t:.1f} s)")

    t = _section(f"{next(step)}/{n} multi-fidelity pretraining (S1 variant c): Ray Train, {workers} DeepSpeed workers "
                 "(ZeRO-1, fp32, gloo)")
    common = [f"cluster.workers={workers}"] + ([f"trainer.steps={steps}"] if steps else []) + list(overrides or [])
    sets = [f"data.train={stores['pretrain']}", f"data.valid={stores['valid']}", f"output={workdir / 'pretrain'}"]
    cfg = load_config(RECIPES / "demo.yaml", sets + common)
    pre = run_training(cfg)
    print(f"  package {pre['package']}; MLflow run {pre['mlflow_run_id']}; "
          f"registered models:/{pre['registered_model']}/{pre['model_version']}  ({time.perf_counter() - t:.1f} s)")
    s1_packages = {"c": pre["package"]}
    if s1:
        t = _section(f"{next(step)}/{n} S1 baselines, same model, recipe and {cfg.trainer.steps} steps: "
                     f"(a) {HIGH} energies only, (b) {HIGH} energies and forces")
        for v in ("a", "b"):
            tv = time.perf_counter()
            s1_packages[v] = train_s1(stores[f"s1_{v}"], workdir / f"s1_{v}", common)["package"]
            print(f"  ({v}) package {s1_packages[v]}  ({time.perf_counter() - tv:.1f} s)")

    tracking = (cfg.tracking.uri, cfg.tracking.experiment)
    t = _section(f"{next(step)}/{n} fine-tune to {TARGET} ({N_TARGET_TRAIN} {HIGH} frames), starting from the registry")
    source = (f"models:/{pre['registered_model']}/{pre['model_version']}" if pre["model_version"] else pre["package"])
    ft = finetune_target(source, stores, workdir / "finetune", tracking, list(overrides or []))
    print(f"  package {ft['package']}; MLflow run {ft['mlflow_run_id']}  ({time.perf_counter() - t:.1f} s)")
    ft_shipped = None
    if shipped:
        t = _section(f"{next(step)}/{n} fine-tune the shipped checkpoint pretrained:{shipped} to {TARGET}, "
                     "the same way, from the registry")
        ft_shipped = shipped_finetune(shipped, stores, workdir, tracking, list(overrides or []))
        if ft_shipped:
            print(f"  package {ft_shipped['package']}; MLflow run {ft_shipped['mlflow_run_id']}  "
                  f"({time.perf_counter() - t:.1f} s)")
        t = _section(f"{next(step)}/{n} train {TARGET} from scratch (pretrained:{shipped}'s architecture, random "
                     "init), the same recipe and budget")
        scratch = scratch_target(shipped, stores, workdir, tracking, list(overrides or []))
        if scratch and ft_shipped:
            ft_shipped["scratch"] = scratch
            print(f"  package {scratch['package']}; MLflow run {scratch['mlflow_run_id']}  "
                  f"({time.perf_counter() - t:.1f} s)")

    t = _section(f"{next(step)}/{n} evaluate")
    out = report(stores, pre, ft, ft_shipped, shipped, s1_packages if s1 else None, cfg)
    (workdir / "results.json").write_text(json.dumps(out, indent=2))
    print(f"\n  ({time.perf_counter() - t:.1f} s)")

    _section(f"{n}/{n} done")
    print(f"Validation {HIGH} forces above were never trained on: the pretraining store has {HIGH} energies only, "
          f"on {S1_FRACTION:.0%} of its frames.")
    print(f"results: {workdir / 'results.json'}")
    print(f"total time: {time.perf_counter() - t_start:.0f} s")
    print("Open the MLflow dashboard with:")
    print(f"  polyfid ui --tracking-uri {cfg.tracking.uri}")
    return out


def report(stores: dict[str, str], pre: dict, ft: dict, ft_shipped: dict | None, shipped: str | None,
           s1_packages: dict[str, str] | None, cfg) -> dict:
    """Print the demo's tables (errors per fidelity, the fine-tuning comparison, S1) and return them."""
    from polyfid.evaluation.metrics import format_table

    tables = {
        "pretrained, held-out frames of the pretraining molecules": evaluate(pre["package"], stores["valid"]),
        f"pretrained + reference refit on the target = fine-tuning step 0, {TARGET} test frames":
            evaluate(pre["package"], stores["target_test"], refit_on=stores["target"], anchor=stores["pretrain"]),
        f"fine-tuned, {TARGET} test frames": evaluate(ft["package"], stores["target_test"]),
    }
    for title, res in tables.items():
        print()
        print(format_table(res, title=title))
    out: dict = dict(tables)
    if ft_shipped:
        own = tables[f"fine-tuned, {TARGET} test frames"]
        rows = {f"the demo's own pretraining ({cfg.trainer.steps} steps, {len(_files()[1])} molecules)": own,
                f"`pretrained:{shipped}` (shipped)": evaluate(ft_shipped["package"], stores["target_test"])}
        if ft_shipped.get("scratch"):
            rows[f"nothing: from scratch ({shipped}'s architecture)"] = evaluate(ft_shipped["scratch"]["package"],
                                                                              stores["target_test"])
        print(f"\nFine-tuning to {TARGET}: {N_TARGET_TRAIN} {HIGH} frames, the same recipe; {HIGH} errors on its "
              f"{own[HIGH]['n_structures']} test frames")
        print(format_finetune_compare(rows))
        out["finetune_compare"] = rows
    if s1_packages:
        rows = [{"variant": v, "labels": s1_labels(v), "heads": cfg.model.head_design if v == "c" else "one head",
                 "runs": [s1_errors(s1_packages[v], stores["valid"])]} for v in ("a", "b", "c")]
        print(f"\nS1: {HIGH} errors on the held-out frames, {cfg.trainer.steps} steps each, seed {cfg.trainer.seed} "
              "(benchmarks/bench_s1.py runs more seeds)")
        print(format_s1_table(rows))
        out["s1"] = rows
    return out

