"""`polyfid baseline`: a linear model on invariant features, with its energy errors beside the network's."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from polyfid.data_shards.named import open_store


def cmd_baseline(a: argparse.Namespace) -> int:
    """Fit the linear baseline, evaluate it (and the network if given) and print one table."""
    from polyfid.evaluation.baseline import BaselineConfig, format_comparison, run_baseline
    from polyfid.infra.resolve import resolve_package

    data = [open_store(p) for p in a.data.split(",")]
    test = [open_store(p) for p in a.test.split(",")] if a.test else None
    model = None
    if a.model:
        from polyfid.models.package import load_package

        model = load_package(resolve_package(a.model, a.tracking_uri))
    config = BaselineConfig(n_radial=a.n_radial, cutoff=a.cutoff, l_max=a.l_max, n_max=a.n_max, seed=a.seed)
    fids = [a.fidelity] if a.fidelity else None
    try:
        report = run_baseline(data, test, fidelities=fids, config=config, model=model, forces=a.forces)
    except ValueError as e:
        raise SystemExit(f"polyfid baseline: error: {e}") from e
    feats = report["features"]
    print(report["split"])
    print(f"features: {len(feats['invariants'])} invariants x {feats['n_radial']} radial functions x "
          f"{len(feats['elements'])} neighbour elements = {feats['per_atom']} per atom, summed per element "
          f"-> {feats['per_structure']} per structure, plus element counts")
    for fid, f in report["fits"].items():
        print(f"  {fid}: ridge {f['ridge']:.1e} (5-fold CV RMSE {f['cv_rmse'] * 1000:.1f} meV) "
              f"on {f['n_train']} structures")
    title = f"energy and force errors on {'the held-out split' if test is None else a.test}"
    print(format_comparison(report, title=title))
    print("element refs only: per-element reference energies fitted on the same data (zero forces)")
    if a.model:
        report["model"] = a.model
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {a.json}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `baseline` subcommand to the `polyfid` parser."""
    s = subparsers.add_parser("baseline", help="ridge regression on invariant features, beside the network")
    s.add_argument("--data", required=True, help="training store(s), comma-separated")
    s.add_argument("--test", help="test store(s); default: a seeded 80/20 split of --data")
    s.add_argument("--model", help="also evaluate this package: path, pretrained:NAME, runs:/ID/package or models:/NAME/VERSION")
    s.add_argument("--fidelity", help="only this fidelity")
    s.add_argument("--forces", action=argparse.BooleanOptionalAction, default=True,
                   help="linear-model forces -dE/dR by autograd, for the F MAE column (default on)")
    s.add_argument("--n-radial", type=int, default=8, help="fixed radial functions (default 8)")
    s.add_argument("--cutoff", type=float, default=5.0, help="neighbour cutoff in Å (default 5.0)")
    s.add_argument("--l-max", type=int, default=3, help="highest tensor rank, 0..3 (default 3)")
    s.add_argument("--n-max", type=int, default=4, help="tensors per invariant product, 1..4 (default 4)")
    s.add_argument("--seed", type=int, default=0, help="seeds the split and the CV folds (default 0)")
    s.add_argument("--json", help="write the results as JSON here")
    s.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    s.set_defaults(fn=cmd_baseline)
