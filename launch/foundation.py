"""Build the foundation checkpoint: pretrain on the corpus, measure it, write its model card, and ship it.

    python -m polyfid.launch.foundation [--stores runs/corpus] [--out runs/foundation] [--name organic-mini]
        [--set trainer.steps=N ...] [--ship]

1. The corpus files become stores (`data_shards/corpus/make_stores.sh`), unless `--stores` already holds them.
2. Multi-fidelity pretraining on every level's training split, one head per level
   (`launch/recipes/foundation.yaml`), on Ray Train + DeepSpeed. Rerunning the same command resumes it.
3. The package is measured per level on the test split (training molecules) and on the held-out molecules.
4. MODEL_CARD.md is written beside the package. `--ship` copies both to `models/pretrained/<name>/`, where
   `pretrained:<name>` finds them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

from polyfid.distributed.loop.stopping import convergence_words
from polyfid.data_shards.corpus.levels import LEVELS
from polyfid.models.package import SHIPPED
from polyfid.data_shards.named import open_store

RECIPE = Path(__file__).resolve().parent / "recipes" / "foundation.yaml"
SPLITS = ("train", "valid", "test", "heldout")


def corpus_stores(folder: Path, files: Path | None = None) -> dict[str, dict[str, str]]:
    """level -> split -> store path, making the stores of the corpus files that `folder` lacks (or that are older
    than their file). `files` defaults to the folder the stores were made from, else the committed corpus."""
    from polyfid.data_shards.corpus.stores import make_stores, source_of

    make_stores(folder, files or source_of(folder), stale_only=True)
    found: dict[str, dict[str, str]] = {}
    for level in LEVELS:
        for split in SPLITS:
            path = folder / f"{level.name}_{split}.zarr"
            if path.exists():
                found.setdefault(level.name, {})[split] = str(path)
    if not found:
        raise FileNotFoundError(f"no corpus stores (<level>_<split>.zarr) in {folder}")
    return found


def pretrain(stores: dict[str, dict[str, str]], out: Path, sets: list[str]) -> dict:
    """Multi-fidelity pretraining on every level's training split; resumes from `out` when it has checkpoints."""
    from polyfid.distributed.config import load_config
    from polyfid.distributed.driver.launcher import run_training

    train = [s["train"] for s in stores.values() if "train" in s]
    valid = [s["valid"] for s in stores.values() if "valid" in s]
    cfg = load_config(RECIPE, [f"data.train={','.join(train)}", f"data.valid={','.join(valid)}",
                               f"output={out / 'pretrain'}"] + sets)
    return run_training(cfg)


def measure(package: str, stores: dict[str, dict[str, str]], figures: Path | None = None,
            ) -> dict[str, dict[str, dict[str, float]]]:
    """level -> split (test, heldout) -> errors of the level's head on that store (eV, eV/Å). With `figures`, a
    parity plot of each head on the held-out molecules goes there (parity_<level>.png)."""
    from polyfid.evaluation.metrics import evaluate_stores
    from polyfid.evaluation.plots import parity_plots
    from polyfid.models.package import load_package

    model = load_package(package)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for level, by_split in stores.items():
        for split in ("test", "heldout"):
            if split in by_split:
                stats = evaluate_stores(model, [open_store(by_split[split])], [level],
                                        keep_points=figures is not None and split == "heldout")
                res = stats.results()
                if level in res:
                    out.setdefault(level, {})[split] = res[level]
                if stats.keep_points:
                    parity_plots(stats, figures)
    return out


def figures_of(package: Path) -> list[Path]:
    """The package's figures: the parity plots `measure` drew, and the learning curve that the training run drew
    from its MLflow metrics (`evaluation.report`, in the run's eval/), copied in."""
    folder = package / "figures"
    curve = package.parent / "eval" / "learning_curve.png"
    if curve.exists():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(curve, folder / curve.name)
    return sorted(folder.glob("*.png")) if folder.exists() else []


def _counts(stores: dict[str, dict[str, str]]) -> dict[str, dict[str, int]]:

    return {lv: {sp: open_store(p).n_structures for sp, p in by.items()} for lv, by in stores.items()}


def write_card(package: Path, name: str, errors: dict, counts: dict[str, dict[str, int]], info: dict,
               figures: list[Path] = ()) -> Path:
    """MODEL_CARD.md beside the package: data, levels, elements, cutoff, errors, command, cost, use and limits."""
    meta = json.loads((package / "polyfid.json").read_text())
    cfg, levels = meta["config"], {lv.name: lv for lv in LEVELS}
    size = sum(p.stat().st_size for p in package.iterdir() if p.is_file())
    lines = [f"# Model card: `pretrained:{name}`", "",
             f"A {cfg['kind']} potential (width {cfg['width']}, {cfg['n_interactions']} interaction layers, cutoff "
             f"{cfg['cutoff']:g} Å) pretrained in multi-fidelity mode, one energy head per level of theory, on the "
             "polyfid pretraining corpus (`data_shards/corpus/`, PROVENANCE.md there): small neutral closed-shell "
             "organic molecules sampled by GFN2-xTB MD at 300-1000 K, normal modes, rattles and compressions.", "",
             "## Data and levels", "",
             "| head (fidelity) | method / basis | code | train | valid | test | held-out molecules |",
             "|---|---|---|---|---|---|---|"]
    for fid in sorted(meta["fidelities"], key=lambda f: f["rank"]):
        lv, n = levels.get(fid["name"]), counts.get(fid["name"], {})
        method = f"{lv.method} / {lv.basis or '-'}" if lv else fid.get("method", "?")
        lines.append(f"| `{fid['name']}` (rank {fid['rank']}) | {method} | {lv.code if lv else '?'} | "
                     + " | ".join(f"{n.get(s, 0):,}" for s in SPLITS) + " |")
    lines += ["", f"Elements: {', '.join(_symbols(meta['elements']))} (Z = {', '.join(map(str, meta['elements']))}). "
              f"Package size {size / 1e6:.2f} MB (safetensors + JSON).", "",
              "## Errors", "",
              "Each level's own head against that level's labels: the test split of the training molecules, and the "
              "molecules held out of training altogether. E in meV (per structure and per atom), F in meV/Å.", "",
              "| head | split | structures | E MAE | E MAE/atom | E RMSE | F MAE | F RMSE |",
              "|---|---|---|---|---|---|---|---|"]
    for level, by_split in errors.items():
        for split, r in by_split.items():
            lines.append(f"| `{level}` | {split} | {r['n_structures']:,} | {_me(r, 'energy_mae')} | "
                         f"{_me(r, 'energy_mae_per_atom')} | {_me(r, 'energy_rmse')} | {_me(r, 'forces_mae')} | "
                         f"{_me(r, 'forces_rmse')} |")
    if figures:
        lines += ["", "Parity plots on the held-out molecules, per head, and the learning curve of the pretraining:", ""]
        lines += [f"![{p.stem}]({p.relative_to(package).as_posix()})" for p in figures]
    lines += ["", "## How it was trained", "",
              f"Command: `{info['command']}`", "",
              f"Wall time: {info['wall_s'] / 60:.1f} min of pretraining"
              + (f" over {info['invocations']} invocations (resumed)" if info.get("invocations", 1) > 1 else "")
              + f", on {info['hardware']}. "
              f"Steps: {info['steps']:,}; {info['workers']} Ray Train workers with DeepSpeed ZeRO-1. "
              f"polyfid {meta.get('polyfid_version', '?')}.", "",
              *_stopping_lines(info.get("best") or {}),
              *_use_and_limits(name, meta)]
    card = package / "MODEL_CARD.md"
    card.write_text("\n".join(lines))
    return card


def _stopping_lines(best: dict) -> list[str]:
    """Which weights were shipped and whether the pretraining converged (best.json of the run)."""
    if not best:
        return ["Convergence: not measured (no validation stores).", ""]
    return [f"Stopping: {best.get('stop_reason', '?')}; the package holds the {best.get('kept', '?')} weights. "
            f"Convergence, by the validation force MAE: {convergence_words(best.get('convergence'))}.", ""]


def _use_and_limits(name: str, meta: dict) -> list[str]:
    elements = ", ".join(_symbols(meta["elements"]))
    fids = sorted(meta["fidelities"], key=lambda f: f["rank"])
    top, low = fids[-1]["name"], fids[0]["name"]
    return ["## Intended use", "",
            f"- A starting point for `polyfid finetune --from pretrained:{name}` on a small dataset of neutral "
            f"organic molecules of {elements} at any level of theory: a new head is added and its reference "
            "energies refitted before the first step.",
            f"- Quick energies and forces of such molecules at any of its levels, e.g. "
            f"`polyfid.Calculator(\"pretrained:{name}\", fidelity=\"{top}\")` (the default is the highest rank, "
            f"`{top}`).", "",
            "## Known limits", "",
            f"- Only {elements}; neutral closed-shell molecules of 2-9 heavy atoms. No ions, radicals, metals, "
            "condensed phases or periodic systems were seen.",
            "- No long-range electrostatics or dispersion beyond the cutoff.",
            f"- The higher the level, the fewer its labels (the table above): the `{top}` head learned from far "
            f"fewer structures than `{low}`, and, where forces are scarcer than energies, from fewer forces still. "
            "Expect it to be the least accurate, most of all on held-out molecules.",
            "- Geometries come from xTB dynamics and distortions, not from reaction paths: bond breaking is "
            "outside the training data.", ""]


def _me(r: dict, key: str) -> str:
    return f"{r[key] * 1e3:.1f}" if key in r else "-"


def _symbols(numbers: list[int]) -> list[str]:
    from ase.data import chemical_symbols

    return [chemical_symbols[int(z)] for z in numbers]


def ship(package: Path, name: str, root: Path = SHIPPED) -> Path:
    """Copy the package and its card to `root/<name>` (replaced), where `pretrained:<name>` finds it."""
    dst = root / name
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(package, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def _wall_log(out: Path, wall_s: float) -> list[float]:
    """Append this invocation's pretraining wall time to out/wall_s.json (a resumed run adds up); all of them."""
    log = out / "wall_s.json"
    walls = json.loads(log.read_text()) if log.exists() else []
    walls.append(round(float(wall_s), 1))
    log.write_text(json.dumps(walls))
    return walls


def hardware() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}"


def portable_args(args: list[str]) -> list[str]:
    """The command's arguments as the card records them: absolute paths (alone or after KEY=) relative to the
    working directory, so that a card names no path of the machine that made it."""
    from polyfid.data_shards.named import portable_ref

    def one(text: str) -> str:
        key, eq, value = text.rpartition("=") if "=" in text and not text.startswith("-") else ("", "", text)
        if os.path.isabs(value) or value.startswith(("sqlite:////", "file:///")):
            value = portable_ref(value)
        return f"{key}{eq}{value}"

    return [one(x) for x in args]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stores", type=Path, default=Path("runs/corpus"), help="the corpus stores (made if empty)")
    ap.add_argument("--out", type=Path, default=Path("runs/foundation"))
    ap.add_argument("--name", default="organic-mini")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the recipe")
    ap.add_argument("--ship", action="store_true", help="copy the package and card to models/pretrained/NAME")
    ap.add_argument("--ship-to", type=Path, default=SHIPPED, help="ship into this folder instead (one on POLYFID_MODELS)")
    a = ap.parse_args(argv)
    stores = corpus_stores(a.stores)
    t0 = time.perf_counter()
    summary = pretrain(stores, a.out.resolve(), a.set)
    walls = _wall_log(a.out, summary.get("wall_s") or time.perf_counter() - t0)
    package = Path(summary["package"])
    errors = measure(str(package), stores, package / "figures")
    (a.out / "errors.json").write_text(json.dumps(errors, indent=2))
    from polyfid.distributed.config import load_config

    cfg = load_config(RECIPE, a.set)
    info = {"command": "python -m polyfid.launch.foundation " + shlex.join(portable_args(argv if argv is not None
                                                                                         else sys.argv[1:])),
            "wall_s": sum(walls), "invocations": len(walls), "hardware": hardware(),
            "steps": cfg.trainer.steps, "workers": cfg.cluster.workers, "best": summary.get("best") or {}}
    card = write_card(package, a.name, errors, _counts(stores), info, figures_of(package))
    print(card.read_text())
    if a.ship:
        print(f"shipped as pretrained:{a.name} in {ship(package, a.name, a.ship_to)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
