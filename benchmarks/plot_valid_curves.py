"""Validation curves of every run in one or more MLflow stores, side by side: does validation settle?

    python benchmarks/plot_valid_curves.py --store before=/tmp/s3_before/mlflow.db --store after=/tmp/s3_after/mlflow.db \
        --metric energy_mae --include '^(multifidelity|reptile|ft_.*replay0|none)$' --out benchmarks/valid_curves_s3.png

One panel per store; one line per (run, fidelity) of `valid/<metric>/<fidelity>`, on a log scale.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def curves(db: str, metric: str, include: str = "") -> dict[str, list[tuple[int, float]]]:
    """{"run / fidelity": [(step, value)]} for every run in the sqlite MLflow store `db`. A run is named by
    its output folder (runs of one recipe share a run name); `include` is a regex on that label."""
    import re

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{Path(db).resolve()}")
    out: dict[str, list[tuple[int, float]]] = {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            name = Path(run.data.params.get("output", run.info.run_name)).name
            if include and not re.search(include, name):
                continue
            for key in run.data.metrics:
                if key.startswith(f"valid/{metric}/"):
                    hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                    if len(hist) > 1:
                        out[f"{name} / {key.split('/')[-1]}"] = hist
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", action="append", required=True, help="LABEL=path/to/mlflow.db (repeatable)")
    ap.add_argument("--metric", default="energy_mae")
    ap.add_argument("--include", default="", help="regex on the runs' output folder names (default: every run)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stores = [s.split("=", 1) for s in a.store]
    fig, axes = plt.subplots(1, len(stores), figsize=(6 * len(stores), 4.5), sharey=True, squeeze=False)
    for ax, (label, db) in zip(axes[0], stores):
        for name, hist in sorted(curves(db, a.metric, a.include).items()):
            steps, values = zip(*hist)
            ax.plot(steps, [v * 1000 for v in values], marker="o", ms=3, label=name)
        ax.set_yscale("log")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel(f"validation {a.metric} (meV or meV/Å)")
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
