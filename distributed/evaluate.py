"""Evaluation: energy and force MAE/RMSE per fidelity (table, JSON, parity plots), learning curves, and the
post-training report logged to an MLflow run (fail-soft, like Tracker)."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from polyfid.models.graph import build_graph

log = logging.getLogger("polyfid.evaluate")


class ErrorStats:
    """Running sums of energy and force errors per fidelity; all-reducible across ranks."""

    # columns: e_abs, e_sq, e_abs_per_atom, e_n, f_abs, f_sq, f_n
    def __init__(self, fidelities: Sequence[str], keep_points: bool = False) -> None:
        self.fidelities = list(fidelities)
        self.sums = torch.zeros(len(self.fidelities), 7, dtype=torch.float64)
        self.keep_points = keep_points
        self.points: dict[str, dict[str, list[np.ndarray]]] = {
            f: {"e_ref": [], "e_pred": [], "f_ref": [], "f_pred": [], "n_atoms": []} for f in self.fidelities
        }

    def add(self, energy: np.ndarray, forces: np.ndarray | None, batch: dict, columns: Sequence[int]) -> None:
        """energy [S, F_model], forces [A, F_model, 3]; batch labels [S, F_data]; columns maps data->model."""
        n_atoms = batch["n_atoms"].astype(np.float64)
        for k, col in enumerate(columns):
            if col < 0:
                continue
            e_ref = batch["energy"][:, k]
            ok = ~np.isnan(e_ref)
            de = energy[ok, col] - e_ref[ok]
            self.sums[k, 0] += float(np.abs(de).sum())
            self.sums[k, 1] += float((de**2).sum())
            self.sums[k, 2] += float((np.abs(de) / n_atoms[ok]).sum())
            self.sums[k, 3] += float(ok.sum())
            name = self.fidelities[k]
            if self.keep_points and ok.any():
                self.points[name]["e_ref"].append(e_ref[ok] / n_atoms[ok])
                self.points[name]["e_pred"].append(energy[ok, col] / n_atoms[ok])
            if forces is None:
                continue
            f_ref = batch["forces"][:, k, :]
            okf = ~np.isnan(f_ref).any(axis=1)
            df = forces[okf, col, :] - f_ref[okf]
            self.sums[k, 4] += float(np.abs(df).sum())
            self.sums[k, 5] += float((df**2).sum())
            self.sums[k, 6] += float(okf.sum() * 3)
            if self.keep_points and okf.any():
                self.points[name]["f_ref"].append(f_ref[okf].ravel())
                self.points[name]["f_pred"].append(forces[okf, col, :].ravel())

    def all_reduce(self) -> None:
        from polyfid.distributed.engine import all_reduce_host

        all_reduce_host(self.sums)

    def results(self) -> dict[str, dict[str, float]]:
        """fidelity -> energy_mae, energy_rmse, energy_mae_per_atom, forces_mae, forces_rmse, n_structures."""
        out: dict[str, dict[str, float]] = {}
        for k, name in enumerate(self.fidelities):
            s = self.sums[k].tolist()
            if s[3] == 0 and s[6] == 0:
                continue
            r: dict[str, float] = {"n_structures": int(s[3])}
            if s[3] > 0:
                r.update(energy_mae=s[0] / s[3], energy_rmse=(s[1] / s[3]) ** 0.5, energy_mae_per_atom=s[2] / s[3])
            if s[6] > 0:
                r.update(forces_mae=s[4] / s[6], forces_rmse=(s[5] / s[6]) ** 0.5)
            out[name] = r
        return out


def predict(model, batch: dict, cutoff: float, dtype: torch.dtype | None, device, forces: bool = True):
    """Model energies [S, F] and forces [A, F, 3] (float64 numpy) for one batch; dtype None: the model's."""
    graph = build_graph(batch, cutoff, dtype=dtype or model.dtype, device=device)
    heads = list(range(len(model.fidelity_names))) if forces else None
    with torch.set_grad_enabled(forces):
        out = model(graph, force_heads=heads, create_graph=False)
    e = out["energy"].detach().double().cpu().numpy()
    f = out["forces"].detach().double().cpu().numpy() if forces else None
    return e, f


def evaluate_batches(
    model,
    batches: Iterable[dict],
    data_fidelities: Sequence[str],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    keep_points: bool = False,
    progress=None,
) -> ErrorStats:
    """Accumulate errors of `model` on batches whose label columns are `data_fidelities`."""
    names = list(model.fidelity_names)
    columns = [names.index(f) if f in names else -1 for f in data_fidelities]
    stats = ErrorStats(data_fidelities, keep_points=keep_points)
    was_training = model.training
    model.eval()
    for batch in batches:
        want_forces = bool(np.isfinite(batch["forces"]).any())
        e, f = predict(model, batch, model.config.cutoff, dtype, device, forces=want_forces)
        stats.add(e, f, batch, columns)
        if progress is not None:
            progress.update(len(batch["n_atoms"]))
    model.train(was_training)
    return stats


def format_table(results: dict[str, dict[str, float]], title: str = "") -> str:
    """A fixed-width table of errors per fidelity (meV and meV/Å)."""
    head = f"{'fidelity':<16}{'n':>6}{'E MAE':>10}{'E RMSE':>10}{'E MAE/atom':>12}{'F MAE':>10}{'F RMSE':>10}"
    unit = f"{'':<16}{'':>6}{'meV':>10}{'meV':>10}{'meV/atom':>12}{'meV/Å':>10}{'meV/Å':>10}"
    lines = ([title] if title else []) + [head, unit, "-" * len(head)]
    for name, r in results.items():
        def g(k: str, width: int) -> str:
            return f"{r[k] * 1000:>{width}.1f}" if k in r else f"{'-':>{width}}"

        lines.append(
            f"{name:<16}{r['n_structures']:>6}{g('energy_mae', 10)}{g('energy_rmse', 10)}"
            f"{g('energy_mae_per_atom', 12)}{g('forces_mae', 10)}{g('forces_rmse', 10)}"
        )
    return "\n".join(lines)


def parity_plots(stats: ErrorStats, out_dir: str | os.PathLike) -> list[Path]:
    """One PNG per fidelity: predicted against reference energy per atom and force components."""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, pts in stats.points.items():
        if not pts["e_ref"]:
            continue
        has_f = bool(pts["f_ref"])
        fig, axes = plt.subplots(1, 2 if has_f else 1, figsize=(9 if has_f else 4.5, 4), squeeze=False)
        panels = [("e", "energy per atom (eV)")] + ([("f", "force component (eV/Å)")] if has_f else [])
        for ax, (key, label) in zip(axes[0], panels):
            ref, pred = np.concatenate(pts[f"{key}_ref"]), np.concatenate(pts[f"{key}_pred"])
            if key == "e":  # energies per atom relative to their mean, so the spread is visible
                shift = ref.mean()
                ref, pred = ref - shift, pred - shift
            ax.scatter(ref, pred, s=4, alpha=0.5)
            lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            mae = float(np.abs(pred - ref).mean())
            ax.set_xlabel(f"reference {label}")
            ax.set_ylabel(f"predicted {label}")
            ax.set_title(f"{name}: MAE {mae * 1000:.1f} m{label.split('(')[1][:-1]}")
        paths.append(save_figure(fig, out_dir / f"parity_{name}.png"))
    return paths


def write_json(results: dict, path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(results, indent=2))
    return p


def store_fidelities(stores: Sequence, only: str | None = None) -> list[str]:
    """Label columns to evaluate: one store's fidelities in its order, several stores' sorted union, or `only`."""
    fids = [f.name for f in stores[0].fidelities] if len(stores) == 1 else sorted(
        {f.name for s in stores for f in s.fidelities})
    if only is not None:
        if only not in fids:
            raise ValueError(f"fidelity {only} is not in the data (it has {', '.join(fids)})")
        fids = [only]
    return fids


def flatten(results: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    """{fid: {metric: v}} -> {prefix/metric/fid: v}, n_structures left out (the layout of valid/... metrics)."""
    return {f"{prefix}/{k}/{fid}": v for fid, r in results.items() for k, v in r.items() if k != "n_structures"}


CURVE_PANELS = (  # (title, metric name or prefix ending in "/", scale to the plotted unit)
    ("training loss", "loss", 1.0),
    ("validation energy MAE (meV)", "valid/energy_mae/", 1000.0),
    ("validation force MAE (meV/Å)", "valid/forces_mae/", 1000.0),
)


def learning_curve_plot(run_id: str, tracking_uri: str, out_png: str | os.PathLike) -> Path | None:
    """Plot the run's loss, loss/* and valid/*_mae histories from MLflow against step; None if it has none."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    keys = sorted(client.get_run(run_id).data.metrics)
    panels = []
    for title, name, scale in CURVE_PANELS:
        prefix = name if name.endswith("/") else name + "/"
        names = [k for k in keys if k == name or k.startswith(prefix)]
        if names:
            panels.append((title, names, scale))
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (title, names, scale) in zip(axes[0], panels):
        positive = True
        for name in names:
            hist = sorted(client.get_metric_history(run_id, name), key=lambda m: (m.step, m.timestamp))
            values = [m.value * scale for m in hist]
            positive = positive and all(v > 0 for v in values)
            ax.plot([m.step for m in hist], values, "o-" if len(hist) < 30 else "-", ms=3, label=name)
        if positive:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    return save_figure(fig, out_png)


def log_to_run(run_id: str, tracking_uri: str, metrics: dict[str, float], files: Sequence[str | os.PathLike],
               step: int = 0, artifact_path: str = "plots") -> int:
    """Log metrics and files to an existing run through Tracker (an outage warns); returns its failure count."""
    from polyfid.distributed.tracking import Tracker

    tracker = Tracker(tracking_uri, run_id=run_id)
    tracker.log_metrics(metrics, step)
    for f in files:
        tracker.log_artifact(f, artifact_path)
    return tracker.failures


def report_to_mlflow(package: str | os.PathLike, stores: Sequence[str], run_id: str | None, tracking_uri: str,
                     out_dir: str | os.PathLike, step: int = 0) -> list[Path]:
    """After training: errors of `package` on `stores`, parity plots and the learning curve, logged to the run.

    Writes the PNGs and `eval.json` into out_dir, logs the PNGs under `plots/` and the errors as
    `eval/<metric>/<fidelity>` metrics at `step`. Never raises: any failure warns and what was written is
    still returned, so neither a tracking outage nor a bad store can crash the end of a training run.
    """
    out, written, metrics = Path(out_dir), [], {}
    try:
        from polyfid.data_shards.reader import iter_all
        from polyfid.data_shards.store import Store
        from polyfid.models.package import load_package

        if stores:
            opened = [Store.open(p) for p in stores]
            fids = store_fidelities(opened)
            stats = evaluate_batches(load_package(package), iter_all(opened, fidelities=fids), fids, keep_points=True)
            metrics = flatten(stats.results(), "eval")
            written.append(write_json(stats.results(), out / "eval.json"))
            written += parity_plots(stats, out)
    except Exception as e:  # noqa: BLE001 - the report must not crash the end of training
        _warn(f"evaluating {package} on {', '.join(map(str, stores))} failed ({type(e).__name__}: {e})")
    if run_id:
        try:
            curve = learning_curve_plot(run_id, tracking_uri, out / "learning_curve.png")
            written += [curve] if curve else []
        except Exception as e:  # noqa: BLE001 - a tracking outage
            _warn(f"reading run {run_id}'s metric history from {tracking_uri} failed "
                  f"({type(e).__name__}: {str(e)[:200]}); no learning curve")
        log_to_run(run_id, tracking_uri, metrics, [p for p in written if p.suffix == ".png"], step)
    return written


def _warn(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    log.warning(msg)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_png: str | os.PathLike) -> Path:
    """Lay out, write (creating the folder) and close a figure; returns the PNG's path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
