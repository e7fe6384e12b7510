"""Fine-tuning that pays: `pretrained:organic-mini` against a tuned scratch run, on targets at a new level of theory.

    python benchmarks/bench_finetune.py --workdir runs/ftbench --phase sweep          # seed 0, valid split only
    python benchmarks/bench_finetune.py --workdir runs/ftbench --phase final --seeds 0,1,2
    python benchmarks/bench_finetune.py --workdir runs/ftbench --phase curve --sizes 50,100,200
    python benchmarks/bench_finetune.py --workdir runs/ftbench --phase report --out benchmarks/RESULTS_finetune.md
    python benchmarks/bench_finetune.py --workdir runs/ftbench96 --set data.atom_budget=96 --steps 3000 ...

With the free low level beside the target (`--low N`, any phase): the training store also holds the GFN2-xTB
labels of its structures, and a second store holds N more GFN2-xTB MD structures of the molecule (make_targets.py
--gfn2); data.oversample gives the target level half of every batch's atoms. Both sides then train two heads.
`--phase report` adds those rows beside GFN2-xTB as-is (its forces against the target's; its energies after a
per-element shift fitted on the training structures).

Targets: `benchmarks/ft_targets/<molecule>.extxyz.gz`, B3LYP/6-31G* energies and forces (PySCF) of GFN2-xTB MD
frames of molecules held out of the pretraining corpus (make_targets.py there), with fixed test (50), valid (20)
and train splits; a run trains on the first N train structures.

Both sides run `launch/recipes/finetune.yaml` (the same steps, validation, energy refit, early stopping and
best-weights selection) with the same architecture (organic-mini's): the fine-tuned run from the shipped
package, the scratch run from a random init (`finetune.scratch_config`). The sweep chooses each side's settings
by the validation score (energy MAE per atom + force MAE, eV and eV/Å, as early stopping scores) on seed 0: three
lrs each (scratch's grid one step higher), then each side's options one at a time at its best lr. The final phase reads the test split once, for the chosen settings, over several seeds.
A finished run in the workdir is reused, so every phase resumes.
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

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ROOT / "benchmarks" / "ft_targets"
RECIPE = ROOT / "launch" / "recipes" / "finetune.yaml"
LEVEL = "b3lyp_631gs"
PARENT = "pretrained:organic-mini"
# Each side gets three lrs (a random init wants larger steps: scratch's grid sits one step higher, and its warm-up
# is the parent's pretraining one, 100, as finetune.scratch_config gives it), then three options one at a time at
# its best lr. The ablations (no_rescale, no_refit) are run after the choice and are not candidates.
FT_LRS = (3e-4, 1e-3, 3e-3)
SCRATCH_LRS = (1e-3, 3e-3, 1e-2)
FT_OPTIONS = {
    "init_gfn2": ["finetune.init_from=gfn2_xtb"],
    "freeze_backbone": ["finetune.freeze=backbone"],
    "replay25": ["finetune.replay_fraction=0.25"],
}
SCRATCH_OPTIONS = {
    "warmup10": ["trainer.warmup_steps=10"],
}
# Not candidates (the chosen settings run 3 seeds and the curve within the same budget of steps): a scratch run of
# 4,000 steps at the chosen lr, to show how far the 1,500-step budget leaves scratch from its convergence.
SCRATCH_SENSITIVITY = {"long": ["trainer.steps=4000"]}
ABLATIONS = {"no_rescale": ["finetune.rescale_head=false"], "no_refit": ["trainer.energy_refit_every=0"]}
LOW = "gfn2_xtb"
LOW_META = {"rank": 1, "method": "GFN2-xTB", "basis": "", "code": "tblite", "dispersion": "D4 (built in)"}
LOW_SETS = ["data.oversample=top", "data.oversample_fraction=0.5"]  # the target level: half of each batch


def variant(a) -> str:
    """The run-name prefix of the data variant: '' (target level only) or 'low<N>_' (with N GFN2 structures)."""
    return f"low{a.low}_" if getattr(a, "low", 0) else ""


def stores(molecule: str, n_train: int, work: Path, low: int = 0) -> dict[str, str]:
    """test, valid and train (the first n_train of the train pool) stores of a target, made once. With `low`, the
    train entry is two stores: the train structures with their GFN2-xTB labels too, and `low` GFN2-only ones."""
    import ase.io

    from polyfid.data_shards.ingest import ingest

    if low:
        out = stores(molecule, n_train, work)
        pool = ase.io.read(str(TARGETS / f"{molecule}.gfn2pool.extxyz.gz"), ":")
        if len(pool) < low:
            raise SystemExit(f"{molecule}: {len(pool)} GFN2 pool structures, {low} wanted (make_targets.py --gfn2)")
        frames = ase.io.read(str(TARGETS / f"{molecule}.extxyz.gz"), ":")
        train = [a for a in frames if a.info["split"] == "train"][:n_train]
        made = []
        for name, sel, levels in ((f"train{n_train}_both", train, (LEVEL, LOW)), (f"gfn2pool{low}", pool[:low], (LOW,))):
            path = work / "stores" / f"{molecule}_{name}.zarr"
            if not path.exists():
                tmp = path.with_name(f".{path.stem}.{os.getpid()}.zarr")
                xyz = tmp.with_suffix(".extxyz")
                ase.io.write(str(xyz), sel, format="extxyz")
                ingest([str(xyz)], str(tmp), dataset=molecule, energy={lv: f"energy_{lv}" for lv in levels},
                       forces={lv: f"forces_{lv}" for lv in levels}, ranks={lv: {LEVEL: 3, LOW: 1}[lv] for lv in levels},
                       fidelity_meta={LOW: LOW_META}, progress=False)
                xyz.unlink()
                _settle(tmp, path)
            made.append(str(path))
        return {**out, "train": ",".join(made)}
    frames = ase.io.read(str(TARGETS / f"{molecule}.extxyz.gz"), ":")
    by = {s: [a for a in frames if a.info["split"] == s] for s in ("train", "valid", "test")}
    if len(by["train"]) < n_train:
        raise SystemExit(f"{molecule}: {len(by['train'])} train structures labelled, {n_train} wanted "
                         "(benchmarks/ft_targets/make_targets.py labels more)")
    out = {}
    for split, sel in (("test", by["test"]), ("valid", by["valid"]), (f"train{n_train}", by["train"][:n_train])):
        path = work / "stores" / f"{molecule}_{split}.zarr"
        if not path.exists():  # built under a name of this process's own, then renamed: the sides run side by side
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.zarr")
            xyz = tmp.with_suffix(".extxyz")
            xyz.parent.mkdir(parents=True, exist_ok=True)
            ase.io.write(str(xyz), sel, format="extxyz")
            ingest([str(xyz)], str(tmp), dataset=molecule, energy={LEVEL: f"energy_{LEVEL}"},
                   forces={LEVEL: f"forces_{LEVEL}"}, ranks={LEVEL: 3}, progress=False)
            xyz.unlink()
            _settle(tmp, path)
        out[split.rstrip("0123456789")] = str(path)
    return out


def _settle(tmp: Path, path: Path) -> None:
    """Move a finished store into place; if a side running beside this one got there first, keep its copy."""
    import shutil

    try:
        tmp.rename(path)
    except OSError:
        shutil.rmtree(tmp)


def run(kind: str, name: str, data: dict, sets: list[str], seed: int, work: Path) -> dict:
    """One fine-tuned (kind 'ft') or scratch run; returns its summary (reused when finished)."""
    from polyfid.distributed.config import RunConfig, apply_overrides, load_config
    from polyfid.distributed.finetune.scratch import scratch_config
    from polyfid.distributed.driver.launcher import run_training
    from polyfid.models.package import read_metadata, resolve_name

    out = work / "runs" / f"{name}_s{seed}"
    done = out / "summary.json"
    if done.exists() and json.loads(done.read_text()).get("package"):
        return json.loads(done.read_text())
    base = [f"data.train={data['train']}", f"data.valid={data['valid']}", f"trainer.seed={seed}",
            f"output={out}", "tracking.enabled=false", "cluster.workers=1"]
    cfg = load_config(RECIPE, base + [f"finetune.source={PARENT}"] + (sets if kind == "ft" else []))
    if kind == "scratch":
        cfg = scratch_config(cfg, read_metadata(resolve_name(PARENT)))
        d = apply_overrides(cfg.to_dict(), sets + [f"output={out}", f"name={name}"])  # the sweep's values on top
        cfg = RunConfig.from_dict(d)
    t0 = time.perf_counter()
    summary = run_training(cfg, shutdown_ray=False)
    summary["bench_wall_s"] = time.perf_counter() - t0
    done.write_text(json.dumps(summary, indent=2))
    return summary


def valid_curve(summary: dict) -> list[dict]:
    path = Path(summary["package"]).parent / "validation.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def swing(summary: dict, steps: int) -> float:
    """The largest ratio of a validation energy MAE after the first 10% of steps to the best one reached by
    then (the issue's stability measure: at most 3)."""
    curve = valid_curve(summary)
    e = [r["errors"][LEVEL]["energy_mae"] for r in curve]
    ratios = [e[i] / max(min(e[: i + 1]), 1e-9) for i, r in enumerate(curve) if r["step"] >= 0.1 * steps]
    return float(max(ratios)) if ratios else float("nan")


def convergence(summary: dict) -> float:
    """Relative fall of the best validation force MAE over the last 20% of the run (issue 29's criterion: below
    3% is converged), by polyfid's own stopping.convergence over the run's validation curve; nan without one."""
    from polyfid.distributed.loop.stopping import convergence as criterion

    curve = valid_curve(summary)
    if not curve:
        return float("nan")
    c = criterion([(r["step"], r["errors"][LEVEL]["forces_mae"]) for r in curve], curve[-1]["step"])
    return float("nan") if c["fall"] is None else c["fall"]


def score(summary: dict) -> float:
    """The best validation score of the run (energy MAE per atom + force MAE), as early stopping scores it."""
    s = [r["errors"][LEVEL]["energy_mae_per_atom"] + r["errors"][LEVEL]["forces_mae"] for r in valid_curve(summary)]
    return float(min(s)) if s else float("inf")


def test_errors(summary: dict, test: str) -> dict:
    from polyfid.distributed.finetune.scratch import compare_table

    r = compare_table({"m": summary["package"]}, [test])["m"][LEVEL]
    return {"E": r["energy_mae"] * 1000, "F": r["forces_mae"] * 1000, "E_rmse": r["energy_rmse"] * 1000,
            "F_rmse": r["forces_rmse"] * 1000}


def sweep(a, work: Path, side: str) -> dict:
    """Seed 0, validation only, one side ('ft' or 'scratch'; the two can run side by side): its lr grid, then its
    options one at a time at its best lr; writes sweep_<side>.json with the chosen settings."""
    lrs, opts = (FT_LRS, FT_OPTIONS) if side == "ft" else (SCRATCH_LRS, SCRATCH_OPTIONS)
    results = {}

    def do(mol: str, name: str, sets: list[str]) -> None:
        s = run(side, f"{mol}_n{a.n}_{variant(a)}{name}", stores(mol, a.n, work, a.low),
                a.common + sets + (LOW_SETS if a.low else []), 0, work)
        results[(mol, name)] = s
        print(f"{mol} {name}: valid score {score(s) * 1000:.1f}, swing {swing(s, a.steps):.2f}", flush=True)

    def best(names: list[str]) -> str:  # the lowest mean valid score over the molecules
        return min(names, key=lambda n: np.mean([score(results[(m, n)]) for m in a.molecules]))

    for mol in a.molecules:
        for lr in lrs:
            do(mol, f"{side}_lr{lr:g}", [f"trainer.lr={lr}"])
    base = best([f"{side}_lr{lr:g}" for lr in lrs])
    options = {base: [f"trainer.lr={base[len(side) + 3:]}"]}
    options.update({f"{side}_{k}": options[base] + v for k, v in opts.items() if not a.lr_only})
    for mol in a.molecules:
        for name, sets in list(options.items())[1:]:
            do(mol, name, sets)
    pick = best(list(options))
    if side == "scratch" and not (a.no_sensitivity or a.lr_only):
        for mol in a.molecules:
            for k, v in SCRATCH_SENSITIVITY.items():
                do(mol, f"scratch_{k}", options[base] + v)
    if a.ablations and side == "ft" and not a.lr_only:
        for mol in a.molecules:
            for k, v in ABLATIONS.items():
                do(mol, f"ft_{k}", options[pick] + v)
    table = {f"{m}|{n}": {"valid_score": score(s), "swing": swing(s, a.steps), "converged_fall": convergence(s),
                          "best_step": (s.get("best") or {}).get("best_step"),
                          "stop_reason": (s.get("best") or {}).get("stop_reason"), "wall_s": s.get("bench_wall_s")}
             for (m, n), s in results.items()}
    out = {"side": side, "chosen": options[pick], "chosen_name": pick, "table": table, "n": a.n,
           "molecules": a.molecules, "low": a.low, "lr_only": a.lr_only, "common": a.common}
    (work / f"sweep_{variant(a)}{side}.json").write_text(json.dumps(out, indent=2))
    print(f"{side}: chose {pick} {options[pick]}", flush=True)
    return out


def final(a, work: Path, sizes: list[int], tag: str) -> dict:
    """Test errors of the chosen settings (sweep.json) over seeds and training-set sizes."""
    sides = (a.side,) if a.side else ("ft", "scratch")
    sweeps = {side: json.loads((work / f"sweep_{variant(a)}{side}.json").read_text()) for side in sides}
    chosen = {side: sw["chosen"] for side, sw in sweeps.items()}
    names = {side: sw["chosen_name"] for side, sw in sweeps.items()}  # seed 0 at the sweep's size: its run
    rows = {}
    for mol in a.molecules:
        for n in sizes:
            data = stores(mol, n, work, a.low)
            for kind in sides:
                for seed in a.seeds:
                    s = run(kind, f"{mol}_n{n}_{variant(a)}{names[kind]}", data,
                            a.common + chosen[kind] + (LOW_SETS if a.low else []), seed, work)
                    r = {**test_errors(s, data["test"]), "swing": swing(s, a.steps), "converged_fall": convergence(s),
                         "best_step": (s.get("best") or {}).get("best_step"), "wall_s": s.get("bench_wall_s")}
                    rows[f"{mol}|{n}|{kind}|{seed}"] = r
                    print(f"{mol} n={n} {kind} seed {seed}: test E {r['E']:.1f} meV F {r['F']:.1f} meV/Å", flush=True)
    # one file per invocation (several run side by side); the report merges them
    part = (f"{variant(a)}{tag}-n{'_'.join(map(str, sizes))}-s{'_'.join(map(str, a.seeds))}-{'_'.join(a.molecules)}"
            f"-{'_'.join(sides)}.json")
    (work / part).write_text(json.dumps({"chosen": chosen, "rows": rows}, indent=2))
    return rows


def _stats(rows: dict, mol: str, n: int, kind: str, key: str) -> tuple[float, float, list[float]]:
    v = [r[key] for k, r in sorted(rows.items()) if k.startswith(f"{mol}|{n}|{kind}|")]  # by seed: paired
    return float(np.mean(v)), float(np.std(v)), v


def _paired_p(a: list[float], b: list[float]) -> float:
    """Two-sided paired t-test p value over seeds (nan with fewer than 2 pairs)."""
    from scipy import stats

    return float(stats.ttest_rel(a, b).pvalue) if len(a) >= 2 and len(a) == len(b) else float("nan")


def report(a, work: Path) -> str:
    """RESULTS_finetune.md from sweep.json, final.json and curve.json (what exists), and the gain table that
    `polyfid models` and the model card show (FINETUNE.json)."""
    lines = ["# Fine-tuning `pretrained:organic-mini` against a tuned scratch run (B3LYP/6-31G*, new molecules)", "",
             f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), no GPU, torch {_torch()}; "
             f"command: `python benchmarks/bench_finetune.py --workdir {a.workdir} --phase ...` (this file: "
             "`--phase report`). Errors in meV (E) and meV/Å (F); test split read once, after the sweep.", ""]
    common = sorted({" ".join(json.loads(p.read_text()).get("common") or []) for p in work.glob("sweep_*.json")})
    if any(common):
        lines += [f"Both sides, every run, on top of the recipe: `{' / '.join(common)}` (`--set`).", ""]
    all_sweeps = [json.loads(p.read_text()) for p in sorted(work.glob("sweep_*.json"))]
    sweeps = [sw for sw in all_sweeps if not sw.get("low")]  # the target-only variant: its final rows below
    if all_sweeps:
        lines += ["## Sweep (seed 0, validation split only)", "",
                  f"Training structures: {all_sweeps[0]['n']}. Score: the best validation energy MAE per atom + force MAE "
                  "(meV/atom + meV/Å), as early stopping scores. Swing: the largest validation energy MAE after "
                  "the first 10% of steps over the best one reached by then (goal: at most 3).", "",
                  "| molecule | run | valid score | swing | F fall, last 20% | best step | stop |",
                  "|---|---|---|---|---|---|---|"]
        for sw in all_sweeps:
            pre = f"low{sw['low']}_" if sw.get("low") else ""
            for key, r in sw["table"].items():
                mol, name = key.split("|")
                fall = _fall(work / "runs" / f"{mol}_n{sw['n']}_{pre}{name}_s0")
                lines.append(f"| {mol} | {pre}{name} | {r['valid_score'] * 1000:.1f} | {r['swing']:.2f} | {fall:.1%} | "
                             f"{r['best_step']} | {(r['stop_reason'] or '').split(';')[0]} |")
        lines.append("")
        lines += [f"Chosen for {'low%d_' % sw['low'] if sw.get('low') else ''}{sw['side']}: `{sw['chosen_name']}` = "
                  f"`{' '.join(sw['chosen'])}` over the recipe `launch/recipes/finetune.yaml`." for sw in all_sweeps]
        lines.append("")
    gains = {}
    for tag, title in (("final", "Test errors at the sweep's size, seeds"), ("curve", "Gain over scratch by size")):
        rows = {k: r for p in sorted(work.glob(f"{tag}-*.json")) for k, r in json.loads(p.read_text())["rows"].items()}
        if not rows:
            continue
        lines += [f"## {title}", "", "| molecule | N train | fine-tuned E | scratch E | fine-tuned F | scratch F | "
                  "F ratio | E ratio | paired p (F) | seeds | max swing | max F fall, last 20% |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for mol, n in sorted({(k.split("|")[0], int(k.split("|")[1])) for k in rows}):
            fe, fe_s, _ = _stats(rows, mol, n, "ft", "E")
            se, se_s, _ = _stats(rows, mol, n, "scratch", "E")
            ff, ff_s, fv = _stats(rows, mol, n, "ft", "F")
            sf, sf_s, sv = _stats(rows, mol, n, "scratch", "F")
            sw_max = max(r["swing"] for k, r in rows.items() if k.startswith(f"{mol}|{n}|"))
            names = {sw["side"]: sw["chosen_name"] for sw in sweeps}
            falls = [_fall(work / "runs" / f"{mol}_n{n}_{names[k.split('|')[2]]}_s{k.split('|')[3]}")
                     for k in rows if k.startswith(f"{mol}|{n}|") and k.split("|")[2] in names]
            lines.append(f"| {mol} | {n} | {fe:.1f} ± {fe_s:.1f} | {se:.1f} ± {se_s:.1f} | {ff:.1f} ± {ff_s:.1f} | "
                         f"{sf:.1f} ± {sf_s:.1f} | {ff / sf:.2f} | {fe / se:.2f} | {_paired_p(fv, sv):.3g} | "
                         f"{len(fv)} | {sw_max:.2f} | {max(falls) if falls else float('nan'):.1%} |")
            if tag == "curve" or str(n) not in gains.get(mol, {}):
                gains.setdefault(mol, {})[str(n)] = {"force_ratio": ff / sf, "energy_ratio": fe / se,
                                                     "finetuned_F": ff, "scratch_F": sf, "seeds": len(fv)}
        lines.append("")
    if gains:
        (work / "FINETUNE.json").write_text(json.dumps(
            {"level": "B3LYP/6-31G* (PySCF), new to the model", "molecules": sorted(gains), "gain": gains,
             "command": "python benchmarks/bench_finetune.py --workdir runs/ftbench --phase final|curve "
                        "(BENCHMARKS.md, fine-tuning that pays)"}, indent=2))
    lines += report_low(work)
    return "\n".join(lines)


def low_as_is(molecule: str) -> dict:
    """GFN2-xTB as-is on the test split, against the target level: force MAE, and energy MAE after a constant
    shift fitted on the training structures (one molecule: the per-element shift is one constant)."""
    import ase.io

    frames = ase.io.read(str(TARGETS / f"{molecule}.extxyz.gz"), ":")
    if f"energy_{LOW}" not in frames[0].info:
        return {}
    d = {s: [a for a in frames if a.info["split"] == s] for s in ("train", "test")}
    shift = np.mean([a.info[f"energy_{LEVEL}"] - a.info[f"energy_{LOW}"] for a in d["train"]])
    e = [abs(a.info[f"energy_{LOW}"] + shift - a.info[f"energy_{LEVEL}"]) for a in d["test"]]
    f = np.concatenate([np.abs(a.arrays[f"forces_{LOW}"] - a.arrays[f"forces_{LEVEL}"]).ravel() for a in d["test"]])
    return {"E": float(np.mean(e)) * 1000, "F": float(np.mean(f)) * 1000}


def report_low(work: Path) -> list[str]:
    """Rows of the low-level variants (low<N>_final-*.json) beside the target-only ones and GFN2-xTB as-is."""
    parts = {}
    for path in sorted(work.glob("*final-*.json")):
        tag = path.name.split("final-")[0]  # '' or 'low<N>_'
        for k, r in json.loads(path.read_text())["rows"].items():
            mol, n, kind, seed = k.split("|")
            parts.setdefault((mol, int(n)), {}).setdefault(f"{kind}{'+' + tag.rstrip('_') if tag else ''}", {})[
                int(seed)] = r
    lows = {(m, n): v for (m, n), v in parts.items() if any("+low" in k for k in v)}
    if not lows:
        return []
    lines = ["## With the free low level beside the target (GFN2-xTB labels of the molecule)", "",
             "`+lowN`: the training structures' GFN2-xTB labels and N more GFN2-xTB MD structures beside the target "
             "level, two heads, the target level half of each batch (`--low N`). Each side's lr was chosen on "
             "validation from its grid (`--lr-only`: no options). GFN2-xTB as-is: its forces against B3LYP's; its "
             "energies after a constant shift fitted on the training structures. Test split, meV and meV/Å, "
             "mean ± std over seeds; p: paired t-test over seeds against `ft+lowN` (F). F / scratch divides by the "
             "target-only scratch run where the workdir has one, else by scratch with the same low level.", "",
             "| molecule | N train | variant | E MAE | F MAE | F / scratch | p (F) vs ft+low | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for (mol, n), v in sorted(lows.items()):
        ref = next(k for k in v if k.startswith("ft+low"))
        # F / scratch: against the target-only scratch run when this workdir has one, else scratch with the low level
        base_kind = "scratch" if "scratch" in v else next((k for k in v if k.startswith("scratch+low")), None)
        base = np.mean([r["F"] for r in v[base_kind].values()]) if base_kind else float("nan")
        free = low_as_is(mol)
        if free:
            lines.append(f"| {mol} | {n} | GFN2-xTB as-is | {free['E']:.1f} | {free['F']:.1f} | "
                         f"{free['F'] / base:.2f} | | |")
        for kind in sorted(v, key=lambda k: ("ft" in k, "+low" in k, k)):
            seeds = sorted(set(v[kind]) & set(v[ref]))
            ev, fv = [v[kind][s]["E"] for s in seeds], [v[kind][s]["F"] for s in seeds]
            p_ = "" if kind == ref else f"{_paired_p(fv, [v[ref][s]['F'] for s in seeds]):.3g}"
            lines.append(f"| {mol} | {n} | {kind} | {np.mean(ev):.1f} ± {np.std(ev):.1f} | {np.mean(fv):.1f} ± "
                         f"{np.std(fv):.1f} | {np.mean(fv) / base:.2f} | {p_} | {len(seeds)} |")
    return lines + [""]


def _fall(run_dir: Path) -> float:
    """convergence() of a finished run folder (nan when it has no validations)."""
    return convergence({"package": str(run_dir / "package")})


def _torch() -> str:
    import torch

    return torch.__version__


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("runs/ftbench"))
    ap.add_argument("--phase", choices=("sweep", "final", "curve", "report"), required=True)
    ap.add_argument("--side", choices=("ft", "scratch"), default=None,
                    help="sweep (required): which side, run both; final and curve: only this side (default both)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS_finetune.md")
    ap.add_argument("--molecules", default="propionitrile,1-propanol")
    ap.add_argument("--n", type=int, default=80, help="training structures of the sweep and the final phase")
    ap.add_argument("--sizes", default="50,100,200", help="training structures of the curve phase")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=1500, help="trainer.steps of both sides (the recipe's: 1500)")
    ap.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for both sides and every run (repeatable), for example "
                    "data.atom_budget=96; use a workdir of its own, since run names do not include it")
    ap.add_argument("--no-sensitivity", action="store_true", help="sweep: skip scratch's 4,000-step run")
    ap.add_argument("--low", type=int, default=0, metavar="N",
                    help="train with N GFN2-xTB structures of the molecule beside the target level (see above)")
    ap.add_argument("--lr-only", action="store_true", help="sweep: the lr grid only, no options")
    ap.add_argument("--ablations", action="store_true", help="sweep: also the chosen fine-tuning without the head "
                    "rescale and without the energy refit")
    a = ap.parse_args(argv)
    a.molecules = [m for m in a.molecules.split(",") if m]
    a.seeds = [int(s) for s in a.seeds.split(",")]
    a.common = [f"trainer.steps={a.steps}"] * (a.steps != 1500) + a.common
    a.workdir.mkdir(parents=True, exist_ok=True)
    if a.phase == "sweep":
        if not a.side:
            ap.error("--phase sweep needs --side ft or --side scratch (run both, side by side)")
        sweep(a, a.workdir, a.side)
    elif a.phase == "final":
        final(a, a.workdir, [a.n], "final")
    elif a.phase == "curve":
        final(a, a.workdir, [int(x) for x in a.sizes.split(",")], "curve")
    else:
        a.out.write_text(report(a, a.workdir) + "\n")
        print(a.out.read_text())


if __name__ == "__main__":
    sys.exit(main())
