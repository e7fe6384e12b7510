"""`polyfid evaluate`: errors per fidelity, parity plots, PES scans, NVE drift, optionally logged to an MLflow run."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any
from polyfid.data_shards.named import open_store

SCAN_KINDS = {"bond": ["bond"], "torsion": ["torsion"], "both": ["bond", "torsion"]}
REFERENCE_CALCS = ("xtb", "emt")


def add_arguments(s: argparse.ArgumentParser) -> None:
    """The evaluate subcommand's flags."""
    s.add_argument("--model", required=True, help="package path or URL (s3://...), pretrained:NAME, runs:/ID/package "
                   "or models:/NAME/VERSION")
    s.add_argument("--data", required=True, help="store(s), comma-separated")
    s.add_argument("--fidelity", help="only this fidelity")
    s.add_argument("--json", help="write the errors (and smoothness, NVE results) as JSON here")
    s.add_argument("--plots", help="write parity, scan and NVE plots (PNG) into this folder")
    s.add_argument("--scan", choices=sorted(SCAN_KINDS), help="PES smoothness: scan a bond, a torsion or both")
    s.add_argument("--scan-structure", type=int, default=0,
                   help="index of the structure in the (first) store to scan and to start NVE from (default 0)")
    s.add_argument("--scan-atoms", action="append", metavar="I,J|A,B,C,D",
                   help="atoms of the bond (2) or torsion (4), 0-based; repeatable (default: chosen from bonds)")
    s.add_argument("--scan-points", type=int, default=37, help="points per scan (default 37)")
    s.add_argument("--scan-fidelity", help="head for scans and NVE (default: the model's highest rank)")
    s.add_argument("--reference-calc", choices=REFERENCE_CALCS,
                   help="reference scan energies: xtb = GFN2-xTB via tblite (pip install tblite); "
                   "emt = ASE's EMT, a classical toy potential for tests")
    s.add_argument("--nve-steps", type=int, default=0, help="velocity-Verlet steps for the NVE drift (0 = off)")
    s.add_argument("--nve-dt", type=float, default=0.5, help="NVE time step in fs (default 0.5)")
    s.add_argument("--nve-temperature", type=float, default=300.0, help="initial temperature in K (default 300)")
    s.add_argument("--seed", type=int, default=0, help="seed of the NVE initial velocities (default 0)")
    s.add_argument("--mlflow-run", metavar="RUN_ID",
                   help="log the metrics and all plots (under plots/) to this existing MLflow run")
    s.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    s.add_argument("--quiet", action="store_true")


def reference_calculator(name: str | None):
    """The ASE calculator behind --reference-calc, or None; a clear SystemExit if tblite is missing."""
    if name is None:
        return None
    if name == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    try:
        from tblite.ase import TBLite
    except ImportError:
        raise SystemExit("polyfid evaluate: --reference-calc xtb needs tblite: pip install tblite "
                         "(or pip install -e '.[qm]'); or leave --reference-calc out") from None
    return TBLite(method="GFN2-xTB", verbosity=0)


def parse_scan_atoms(items: list[str] | None) -> dict[str, tuple[int, ...]]:
    """--scan-atoms values -> {"bond": (i, j), "torsion": (a, b, c, d)} by their length."""
    out: dict[str, tuple[int, ...]] = {}
    for item in items or []:
        try:
            idx = tuple(int(v) for v in item.split(","))
        except ValueError:
            raise SystemExit(f"polyfid evaluate: --scan-atoms expects comma-separated integers, got {item!r}") from None
        if len(idx) not in (2, 4):
            raise SystemExit(f"polyfid evaluate: --scan-atoms takes 2 atoms (bond) or 4 (torsion), got {item!r}")
        out["bond" if len(idx) == 2 else "torsion"] = idx
    return out


def format_physics(scans: list[Any], nve: Any | None) -> str:
    """A short table of the smoothness metrics of each scan, and the NVE drift."""
    lines = []
    if scans:
        head = f"{'scan':<16}{'roughness':>12}{'span':>9}{'extrema':>9}{'ref':>5}{'spurious':>10}{'MAE-offset':>12}"
        lines += ["PES smoothness (roughness = mean (d²E/dx²)²; bond eV²/Å⁴, torsion eV²/rad⁴)", head,
                  f"{'':<16}{'':>12}{'eV':>9}{'':>9}{'':>5}{'':>10}{'meV':>12}", "-" * len(head)]
        for r in scans:
            m = r.metrics()
            name = f"{r.kind} {'-'.join(map(str, r.atoms))}"

            def g(k: str, fmt: str, scale: float = 1.0, m=m) -> str:
                return "-" if k not in m else format(m[k] * scale if scale != 1.0 else m[k], fmt)

            lines.append(f"{name:<16}{m['roughness']:>12.4g}{m['span_ev']:>9.3f}{m['n_extrema']:>9d}"
                         f"{g('n_extrema_ref', 'd'):>5}{g('spurious_extrema', '+d'):>10}"
                         f"{g('mae_offset_ev', '.1f', 1000.0):>12}")
    if nve is not None:
        m = nve.metrics()
        lines += [""] if scans else []
        lines.append(f"NVE: {m['steps']} steps of {nve.dt_fs} fs from {nve.temperature_K:g} K, {nve.n_atoms} atoms: "
                     f"drift {m['drift_mev_per_atom_per_ps']:.3g} meV/atom/ps, max |ΔE| "
                     f"{m['max_abs_de_mev_per_atom']:.3g} meV/atom ({m['max_abs_de_ev'] * 1000:.3g} meV)")
    return "\n".join(lines)


def physics_metrics(scans: list[Any], nve: Any | None) -> dict[str, float]:
    """MLflow metric names: smoothness/<kind>/<metric> and nve/<metric>."""
    out = {f"smoothness/{r.kind}/{k}": float(v) for r in scans for k, v in r.metrics().items()}
    if nve is not None:
        out.update({f"nve/{k}": float(v) for k, v in nve.metrics().items()})
    return out


def run_physics(a: argparse.Namespace, model, store, reference, plot_dir: Path | None,
                ) -> tuple[dict[str, Any], list[Path], list[Any], Any | None]:
    """The --scan and --nve-steps part; prints its table, returns (results to add, plots, scans, NVE or None)."""
    from polyfid.evaluation import pes

    atoms = pes.structure_from_store(store, a.scan_structure)
    chosen = parse_scan_atoms(a.scan_atoms)
    scans, nve, res, plots = [], None, {}, []
    for kind in SCAN_KINDS.get(a.scan or "", []):
        try:
            scans.append(pes.scan(model, atoms, kind, chosen.get(kind), points=a.scan_points,
                                  fidelity=a.scan_fidelity, reference=reference,
                                  reference_name=f"reference ({a.reference_calc})"))
        except ValueError as e:
            raise SystemExit(f"polyfid evaluate: {kind} scan of structure {a.scan_structure}: {e}") from None
    if a.nve_steps > 0:
        nve = pes.nve_drift(model, atoms, a.scan_fidelity, steps=a.nve_steps, dt_fs=a.nve_dt,
                            temperature_K=a.nve_temperature, seed=a.seed)
    print()
    print(format_physics(scans, nve))
    if scans:
        res["smoothness"] = {"structure": a.scan_structure, "scans": [r.to_dict() for r in scans]}
    if nve is not None:
        res["nve"] = {"structure": a.scan_structure, **nve.to_dict()}
    if plot_dir is not None and scans:
        plots.append(pes.plot_scans(scans, plot_dir / "pes_scans.png"))
    if plot_dir is not None and nve is not None:
        plots.append(pes.plot_nve(nve, plot_dir / "nve.png"))
    return res, plots, scans, nve


def run(a: argparse.Namespace) -> int:
    """Evaluate a package on stores; optionally scan, run NVE, write JSON and plots, log to MLflow."""
    from tqdm import tqdm

    from polyfid.infra.resolve import resolve_tracking_uri
    from polyfid.evaluation.metrics import evaluate_stores, flatten, format_table, store_fidelities, write_json
    from polyfid.evaluation.plots import parity_plots
    from polyfid.evaluation.report import log_report
    from polyfid.infra.resolve import resolve_package
    from polyfid.models.package import load_package

    uri = resolve_tracking_uri(a.tracking_uri)
    model = load_package(resolve_package(a.model, uri))
    stores = [open_store(p) for p in a.data.split(",")]
    try:
        fids = store_fidelities(stores, a.fidelity)
    except ValueError as e:
        raise SystemExit(f"polyfid: --fidelity: {e}") from None
    if a.scan_fidelity and a.scan_fidelity not in model.fidelity_names:
        raise SystemExit(f"polyfid: --scan-fidelity {a.scan_fidelity} is not a head of {a.model} "
                         f"(it has {', '.join(model.fidelity_names)})")
    reference = reference_calculator(a.reference_calc if a.scan else None)
    plot_dir = Path(a.plots) if a.plots else (Path(tempfile.mkdtemp(prefix="polyfid-eval-")) if a.mlflow_run else None)

    total = sum(s.n_structures for s in stores)
    with tqdm(total=total, desc="evaluate", unit="structure", disable=a.quiet) as bar:
        stats = evaluate_stores(model, stores, fids, keep_points=plot_dir is not None, progress=bar)
    res: dict[str, Any] = stats.results()
    print(format_table(res, title=f"{a.model} on {a.data}"))
    plots = parity_plots(stats, plot_dir) if plot_dir is not None else []
    scans, nve = [], None
    if a.scan or a.nve_steps > 0:
        extra, more_plots, scans, nve = run_physics(a, model, stores[0], reference, plot_dir)
        res.update(extra)
        plots += more_plots

    if a.mlflow_run:
        metrics = {**flatten({f: r for f, r in res.items() if f in fids}, "eval"), **physics_metrics(scans, nve)}
        plots, failures = log_report(a.mlflow_run, uri, metrics, plots, plot_dir,
                                     warn=lambda msg: print(f"polyfid evaluate: {msg}"))
        if failures:
            print(f"polyfid evaluate: logging to MLflow run {a.mlflow_run} at {uri} failed; results are local only")
        else:
            print(f"logged {len(metrics)} metrics and {len(plots)} plots to MLflow run {a.mlflow_run} (plots/)")
    if a.json:
        write_json(res, a.json)
        print(f"wrote {a.json}")
    for p in plots if a.plots else []:
        print(f"wrote {p}")
    return 0
