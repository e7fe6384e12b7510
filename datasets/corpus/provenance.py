"""PROVENANCE.md of the corpus, written from what the result store holds so far; `export_all` writes the files
and then PROVENANCE.md."""
from __future__ import annotations

import collections
import dataclasses
import json
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from polyfid.datasets.corpus.export import FILES_DIR, SPLIT_FRACTIONS, Corpus, export_files
from polyfid.data_shards.corpus.levels import Level
from polyfid.datasets.corpus.sample import wanted
from polyfid.datasets.corpus.store import label_key
from polyfid.data_shards.corpus import DATA_DIR

RESUME = ("nohup .venv/bin/python -m polyfid.datasets.corpus.generate --set nice=19 "
          ">> /tmp/corpus.log 2>&1 &")


def code_versions() -> dict[str, str]:
    """Versions of the codes that produced the corpus, and the git commit of this repository."""
    out = {}
    for pkg in ("tblite", "pyscf", "rdkit", "ase", "numpy", "ray"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        from pyscf.dft import libxc
        out["libxc"] = str(libxc.__version__)
    except Exception:
        pass
    out["python"] = platform.python_version()
    try:
        out["polyfid git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                            text=True, cwd=DATA_DIR, timeout=10).stdout.strip()
    except Exception:
        pass
    return out


def level_stats(corpus: Corpus, label_all: bool) -> list[dict]:
    """Per level: planned energies/forces on the sampled structures, done, failed and CPU seconds."""
    rows = []
    for level in corpus.levels:
        store = corpus.stores[level.name]
        plan_e = plan_f = 0
        for mol in corpus.molecules:
            if mol.name not in corpus.structures:
                continue
            for h in corpus.structures[mol.name].hashes():
                e, f = wanted(level, mol, h, label_all)
                plan_e, plan_f = plan_e + e, plan_f + f
        recs = list(store.records.values())
        ok = [r for r in recs if r.ok]
        ok_e = [r.cpu_s for r in ok if r.forces is None]
        ok_f = [r.cpu_s for r in ok if r.forces is not None]
        rows.append(dict(level=level.name, planned_e=plan_e, planned_f=plan_f, done_e=len(ok),
                         done_f=len(ok_f), failed=len(recs) - len(ok),
                         retried_ok=sum(r.retried for r in ok), cpu_s=float(sum(r.cpu_s for r in recs)),
                         mean_e=float(np.mean(ok_e)) if ok_e else float("nan"),
                         mean_f=float(np.mean(ok_f)) if ok_f else float("nan")))
    return rows


def _levels_section(corpus: Corpus, stats: list[dict]) -> list[str]:
    lines = ["## Levels of theory (one fidelity each)", "",
             "| fidelity | method | basis | code | dispersion | rank | settings |", "|---|---|---|---|---|---|---|"]
    lines += [f"| `{lv.name}` | {lv.method} | {lv.basis or '-'} | {lv.code} | {lv.dispersion} | {lv.rank} | "
              f"{lv.settings} |" for lv in corpus.levels]
    lines += ["", "## Counts and cost per level", "",
              "Planned counts are over the structures sampled so far. CPU seconds are process CPU time of the "
              "label calls (one thread each), failures and retries included; means are per labelled structure.", "",
              "| fidelity | energies done / planned | forces done / planned | failed (dropped) | "
              "retried, then ok | CPU s total | CPU s per E-only label | CPU s per E+F label |",
              "|---|---|---|---|---|---|---|---|"]
    for s in stats:
        lines.append(f"| `{s['level']}` | {s['done_e']} / {s['planned_e']} | {s['done_f']} / {s['planned_f']} | "
                     f"{s['failed']} | {s['retried_ok']} | {s['cpu_s']:.0f} | {s['mean_e']:.3g} | "
                     f"{s['mean_f']:.3g} |")
    return lines + [""]


def _sampling_section(corpus: Corpus, cfg) -> list[str]:
    kinds: collections.Counter = collections.Counter()
    cpu = 0.0
    for st in corpus.structures.values():
        kinds.update(str(k) for k in st.sampler)
        cpu += st.cpu_s
    c = cfg
    return ["## Sampling", "",
            "- Start: RDKit ETKDGv3 embedding (seed = base seed + molecule index), MMFF94 optimisation, then "
            "GFN2-xTB optimisation (ASE BFGS, fmax 0.02 eV/A, at most 300 steps).",
            f"- GFN2-xTB Langevin MD (ASE), timestep {c.timestep_fs} fs, friction {c.friction_per_fs}/fs, "
            f"temperatures {', '.join(f'{t:g}' for t in c.md_temperatures)} K, one trajectory each: "
            f"{c.md_equil} equilibration steps, then {c.md_frames} frames every {c.md_stride} steps.",
            f"- Normal modes: {c.nm_frames} frames per molecule; GFN2-xTB Hessian by central differences of "
            "the forces (h 0.005 A); each mode Boltzmann-populated, q ~ N(0, kT/k), T ~ "
            f"U({c.nm_temperatures[0]:g}, {c.nm_temperatures[1]:g}) K per frame, modes softer than 300 cm^-1 "
            "floored.",
            f"- Repulsive geometries: {c.rattle_frames} rattles (sigma 0.08-0.2 A) and {c.compress_frames} "
            "compressions per molecule (whole molecule scaled by 0.78-0.95, or one bond to 0.72-0.9 of its "
            "length, plus 0.03 A noise); no pair closer than 0.55 A.",
            f"- Base seed {c.seed}; RNG per molecule and sampler `default_rng([seed, index, kind, ...])`.",
            f"- Structures sampled so far: {sum(kinds.values())} in {len(corpus.structures)} molecules; "
            f"sampling CPU time {cpu:.0f} s.", "",
            "| sampler | structures |", "|---|---|",
            *[f"| {k} | {n} |" for k, n in sorted(kinds.items())], ""]


def _molecules_section(corpus: Corpus) -> list[str]:
    held = [m.name for m in corpus.molecules if m.role == "heldout"]
    lines = ["## Molecules and splits", "",
             f"- {sum(m.role != 'target' for m in corpus.molecules)} molecules in `molecules.csv`.",
             f"- Held out (never in any training split; all their structures are `heldout`): "
             f"{', '.join(held)}.",
             f"- Training molecules: split by structure, train / valid / test = "
             f"{SPLIT_FRACTIONS[0]:g} / {SPLIT_FRACTIONS[1] - SPLIT_FRACTIONS[0]:.1f} / "
             f"{1 - SPLIT_FRACTIONS[1]:.1f}, by a second fraction of the structure hash.",
             "- S3 target: paracetamol (`CC(=O)Nc1ccc(O)cc1`, 20 atoms, not in the list): MD frames at the "
             "same temperatures, split like a training molecule, and two scans of the GFN2-xTB minimum "
             "(phenol O-H stretch, only H moves; amide C5-C4-N3-C1 torsion, the acetamide side rotates).", "",
             "| molecule | group | role | atoms | structures | sampling CPU s |", "|---|---|---|---|---|---|"]
    for m in corpus.molecules:
        st = corpus.structures.get(m.name)
        if st is not None:
            lines.append(f"| {m.name} | {m.group} | {m.role} | {len(st.numbers)} | {len(st.qpos)} | "
                         f"{st.cpu_s:.0f} |")
    return lines + [""]


def _failures_section(corpus: Corpus) -> list[str]:
    lines = ["## Failures", ""]
    names = {}
    for mol in corpus.molecules:
        if mol.name in corpus.structures:
            st = corpus.structures[mol.name]
            for h, sampler in zip(st.hashes(), st.sampler):
                for lv in corpus.levels:
                    names[label_key(h, lv.name)] = f"{mol.name} ({sampler})"
    fails = [(lv.name, r) for lv in corpus.levels for r in corpus.stores[lv.name].records.values() if not r.ok]
    lines.append(f"{len(fails)} calculations failed twice (default, then safe settings) and were dropped.")
    lines += [f"- `{lv}` {names.get(r.key, '?')} key {r.key}: {r.error}" for lv, r in fails[:50]]
    return lines + [""]


def write_provenance(corpus: Corpus, root: Path, cfg, files: dict[str, int]) -> None:
    """Write ``root/PROVENANCE.md``."""
    stats = level_stats(corpus, cfg.label_all)
    v = code_versions()
    costs = root / "COSTS.md"
    lines = ["# Pretraining corpus: provenance", "",
             "Written by `python -m polyfid.datasets.corpus.generate` (or `--export-only`) from the result "
             "store (`structures/`, `labels/`); it reflects everything computed so far. Resume the labelling "
             f"with `{RESUME}`.", "",
             "Order of the work: GFN2 and GFN1 labels of each sampled molecule before the next molecule is "
             "sampled; then HF/6-31G; then the S3 target at wB97X/6-31G* (scans first; a small set that is only "
             "useful complete); then the main wB97X/6-31G* labels. Within a level, chunks go round-robin over "
             "the molecules and each molecule's structures in hash order, so a partial level is an even random "
             "subset of the planned one.", "",
             "Energies are total energies in eV, forces in eV/A (= -gradient); info key `energy_<fidelity>`, "
             "array `forces_<fidelity>`; positions in A, rounded to 1e-5 A (labels computed on the rounded "
             "positions). Neutral singlets, no cell, no pbc.", "",
             "Code versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", "",
             f"Configuration: `{json.dumps(dataclasses.asdict(cfg))}`", "",
             *_levels_section(corpus, stats), *_sampling_section(corpus, cfg), *_molecules_section(corpus),
             *(["Measured cost per structure: see `COSTS.md`; force check: see `FD_CHECK.md`.", ""]
               if costs.exists() else []),
             *_failures_section(corpus),
             "## Files", "",
             f"Under `{FILES_DIR}/`; frames per file (the test compares these with the files).", "",
             "| file | frames |", "|---|---|",
             *[f"| `{name}` | {n} |" for name, n in sorted(files.items())], ""]
    (root / "PROVENANCE.md").write_text("\n".join(lines))


def export_all(root: Path, cfg, levels: Sequence[Level], argv: Optional[Sequence[str]] = None) -> dict[str, int]:
    """Write the files and PROVENANCE.md for everything computed so far under ``root``."""
    root = Path(root)
    corpus = Corpus.load(root, levels)
    files = export_files(corpus, root)
    write_provenance(corpus, root, cfg, files)
    return files
