"""`polyfid finetune`: adapt a pretrained package to a small target store, and report what it cost."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from polyfid.launch.summary import print_summary

RECIPES = Path(__file__).parent / "recipes"


def add_arguments(s: argparse.ArgumentParser) -> None:
    """The fine-tuning flags (each also reachable as a config key with --set)."""
    s.add_argument("--from", dest="source", required=True, help="package path, pretrained:NAME (see `polyfid models`), runs:/ID/package or models:/NAME/V")
    s.add_argument("--data", required=True, help="target store(s), comma-separated")
    s.add_argument("--valid", help="validation store(s): step-0 errors, early stopping, best weights, comparisons")
    s.add_argument("--head", help="fidelity to fine-tune (new name: a new head, initialised from the closest one)")
    s.add_argument("--init-from", metavar="HEAD", help="a new head starts as a copy of this head of the parent "
                   "(default: the closest by rank)")
    s.add_argument("--freeze", choices=("none", "backbone"), help="what to freeze (default: none)")
    s.add_argument("--replay", type=float, metavar="FRACTION",
                   help="share of each batch's atoms replayed from the pretraining stores in the package lineage")
    s.add_argument("--replay-stores", help="replay from these stores instead of the lineage's (comma-separated)")
    s.add_argument("--patience", type=int, help="early stopping: validations without improvement (0: never)")
    s.add_argument("--compare-scratch", action="store_true",
                   help="also train the same budget from a random init and print both models' errors")
    s.add_argument("--out", required=True, help="output package folder (the run lives beside it)")


def run(a: argparse.Namespace, load_config) -> int:
    """Run the fine-tuning (and the scratch comparison) and print the summary."""
    from polyfid.distributed.finetune.scratch import format_compare
    from polyfid.distributed.driver.launcher import compare_with_scratch
    from polyfid.distributed.driver.launcher import run_training

    extra = [f"finetune.source={a.source}", f"data.train={a.data}"]
    for flag, key in ((a.valid, "data.valid"), (a.head, "finetune.head"), (a.init_from, "finetune.init_from"),
                      (a.freeze, "finetune.freeze"),
                      (a.replay, "finetune.replay_fraction"), (a.replay_stores, "finetune.replay_stores"),
                      (a.patience, "stopping.patience")):
        if flag is not None:
            extra.append(f"{key}={flag}")
    if a.compare_scratch:
        extra.append("finetune.compare_scratch=true")
    cfg = load_config(a.config or str(RECIPES / "finetune.yaml"), extra + (a.set or []))
    from polyfid.infra.run_storage import is_remote

    if is_remote(a.out):  # s3://bucket/runs/NAME[/package]: the run's folder is on object storage
        url = a.out.rstrip("/")
        cfg.output = url[: -len("/package")] if url.endswith("/package") else url
        out = None
    else:
        out = Path(a.out)
        cfg.output = str(out.parent if out.name == "package" else out)  # --out may name the package folder itself
    summary = run_training(cfg)
    if out is not None and summary.get("package") and out.name == "package" and Path(summary["package"]) != out.resolve():
        shutil.copytree(summary["package"], out, dirs_exist_ok=True)
    print_finetune_summary(summary)
    if cfg.finetune.compare_scratch and summary.get("package"):
        cmp = compare_with_scratch(cfg, summary)
        label = "validation" if cfg.data.valid else "TRAINING (no --valid given)"
        print()
        print(format_compare(cmp["errors"], f"Same budget ({cfg.trainer.steps} steps), errors on the {label} data:"))
    return 0


def print_finetune_summary(s: dict) -> None:
    """Package, MLflow run and version, the step-0 error, early stopping and forgetting."""
    print_summary(s)
    if s.get("stopped"):
        return
    if s.get("step0_validation"):
        print("step 0 (after the reference refit): " + "; ".join(
            f"{fid} E {r.get('energy_mae', float('nan')) * 1000:.1f} meV, F {r.get('forces_mae', float('nan')) * 1000:.1f} meV/Å"
            for fid, r in s["step0_validation"].items()))
    if s.get("best"):
        b = s["best"]
        print(f"{b.get('stop_reason', '')}; the package holds the {b.get('kept', 'best')} weights")
    for fid, r in (s.get("forgetting") or {}).items():
        print(f"forgetting on the parent's data, {fid} (fine-tuned − parent, meV or meV/Å): " + ", ".join(
            f"{k[:-len('_increase')]} {r[k] * 1000:+.1f}" for k in r if k.endswith("_increase")))
    if s.get("forgetting_hint"):
        print("hint: " + s["forgetting_hint"])
