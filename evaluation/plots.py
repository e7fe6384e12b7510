"""Figures of an evaluation: parity plots per fidelity and a run's learning curve, drawn off-screen (Agg)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from polyfid.evaluation.metrics import ErrorStats


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
