"""What `polyfid pretrain` and `polyfid finetune` print when a training ends."""

from __future__ import annotations

from polyfid.distributed.loop.stopping import convergence_words


def print_summary(s: dict) -> None:
    """Package, MLflow run, registered version and wall time; or how to resume a run stopped on request."""
    if s.get("stopped"):
        print(f"stopped on request; checkpoint in {s['checkpoints']}. Run the same command again to resume"
              f" (MLflow run {s['mlflow_run_id']} continues).")
        return
    print(f"package: {s['package']}")
    if s.get("mlflow_run_id"):
        print(f"MLflow run: {s['mlflow_run_id']}  (runs:/{s['mlflow_run_id']}/package)")
    if s.get("model_version"):
        print(f"registered: models:/{s['registered_model']}/{s['model_version']}")
    print(f"training wall time: {s['wall_s']:.1f} s")
    if (s.get("best") or {}).get("convergence"):
        print(convergence_words(s["best"]["convergence"]))
