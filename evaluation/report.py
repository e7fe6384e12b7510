"""The evaluation report of a run: errors, parity plots and the learning curve, logged to MLflow (fail-soft,
like Tracker). `polyfid evaluate` and the end of training both report through `log_report`."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

from polyfid.evaluation.metrics import evaluate_stores, flatten, store_fidelities, write_json
from polyfid.evaluation.plots import learning_curve_plot, parity_plots
from polyfid.data_shards.named import open_store

log = logging.getLogger("polyfid.evaluate")


def log_to_run(run_id: str, tracking_uri: str, metrics: dict[str, float], files: Sequence[str | os.PathLike],
               step: int = 0, artifact_path: str = "plots") -> int:
    """Log metrics and files to an existing run through Tracker (an outage warns); returns its failure count."""
    from polyfid.infra.tracking import Tracker

    tracker = Tracker(tracking_uri, run_id=run_id)
    tracker.log_metrics(metrics, step)
    for f in files:
        tracker.log_artifact(f, artifact_path)
    return tracker.failures


def log_report(run_id: str, tracking_uri: str, metrics: dict[str, float], plots: Sequence[Path],
               out_dir: str | os.PathLike, step: int = 0, warn: Callable[[str], None] | None = None,
               ) -> tuple[list[Path], int]:
    """Draw the run's learning curve into out_dir, then log `metrics` and the PNGs (under plots/) to the run.

    Reading the metric history can fail (a tracking outage, no such run): `warn` (default: a RuntimeWarning)
    gets the message and the curve is left out; logging never raises. Returns the plots with the curve
    added and Tracker's failure count.
    """
    plots = list(plots)
    try:
        curve = learning_curve_plot(run_id, tracking_uri, Path(out_dir) / "learning_curve.png")
        plots += [curve] if curve else []
    except Exception as e:  # noqa: BLE001 - a tracking outage: the local results still stand
        (warn or _warn)(f"reading run {run_id}'s metric history from {tracking_uri} failed "
                        f"({type(e).__name__}: {str(e)[:200]}); no learning curve")
    return plots, log_to_run(run_id, tracking_uri, metrics, [p for p in plots if p.suffix == ".png"], step)


def report_to_mlflow(package: str | os.PathLike, stores: Sequence[str], run_id: str | None, tracking_uri: str,
                     out_dir: str | os.PathLike, step: int = 0) -> list[Path]:
    """After training: errors of `package` on `stores`, parity plots and the learning curve, logged to the run.

    Writes the PNGs and `eval.json` into out_dir, logs the PNGs under `plots/` and the errors as
    `eval/<metric>/<fidelity>` metrics at `step`. Never raises: any failure warns and what was written is
    still returned, so neither a tracking outage nor a bad store can crash the end of a training run.
    """
    out, written, metrics = Path(out_dir), [], {}
    try:
        from polyfid.models.package import load_package

        if stores:
            opened = [open_store(p) for p in stores]
            fids = store_fidelities(opened)
            stats = evaluate_stores(load_package(package), opened, fids, keep_points=True)
            metrics = flatten(stats.results(), "eval")
            written.append(write_json(stats.results(), out / "eval.json"))
            written += parity_plots(stats, out)
    except Exception as e:  # noqa: BLE001 - the report must not crash the end of training
        _warn(f"evaluating {package} on {', '.join(map(str, stores))} failed ({type(e).__name__}: {e})")
    if run_id:
        written, _ = log_report(run_id, tracking_uri, metrics, written, out, step)
    return written


def _warn(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    log.warning(msg)
