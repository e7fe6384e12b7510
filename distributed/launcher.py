"""The driver: resolve the config, open the MLflow run, run Ray Train workers, register the package."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from polyfid.data_shards.store import Store
from polyfid.distributed.config import ConfigError, RunConfig, save_config
from polyfid.distributed.engine import ensure_extension_cache
from polyfid.distributed.finetune import forgetting_advice, measure_forgetting
from polyfid.distributed.progress import interactive, quiet_libraries, verbose
from polyfid.distributed.replay import lineage_stores, open_replay_stores
from polyfid.distributed.steps import get_step_function
from polyfid.distributed.tracking import Tracker, download_package
from polyfid.distributed.worker import STOP_FILE
from polyfid.models.package import read_metadata

log = logging.getLogger("polyfid.launcher")


def _check_stores(cfg: RunConfig) -> None:
    """Open every store now, so that a wrong path fails before any worker starts."""
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give at least one store (data.train=PATH[,PATH...])")
    for p in cfg.data.train + cfg.data.valid:
        Store.open(p)


def _fetch_parent(cfg: RunConfig) -> str | None:
    """If the fine-tuning source is an MLflow URI, download it; returns the original URI."""
    src = cfg.finetune.source
    if not src:
        return None
    if src.startswith(("runs:/", "models:/")):
        local = download_package(src, cfg.tracking.uri, Path(cfg.output) / "parent")
        cfg.finetune.source = str(local)
        return src
    if not (Path(src) / "polyfid.json").exists():
        raise ConfigError(f"finetune.source={src} is not a package folder (no polyfid.json) nor an MLflow URI")
    return src


def _resolve_replay(cfg: RunConfig, parent_meta: dict) -> None:
    """Fill finetune.replay_stores from the parent's lineage; without a readable store, replay is turned off."""
    if not cfg.finetune.source or cfg.finetune.replay_fraction <= 0:
        return
    paths = cfg.finetune.replay_stores or lineage_stores(parent_meta)
    fingerprints = {s.get("path"): s.get("fingerprint") for s in (parent_meta.get("lineage") or {}).get("stores", [])}
    opened = open_replay_stores(paths, fingerprints)
    cfg.finetune.replay_stores = [str(s.path) for s in opened]
    if not opened:
        log.warning("finetune.replay_fraction=%g but no pretraining store can be read (lineage: %s); "
                    "fine-tuning without replay", cfg.finetune.replay_fraction, ", ".join(paths) or "none")
        cfg.finetune.replay_fraction = 0.0


def _init_ray(cfg: RunConfig) -> None:
    """Start or join Ray. Unless POLYFID_LOG_LEVEL=debug, Ray's own INFO/WARNING chatter (start-up, token
    set-up, scheduling) stays in Ray's session logs, out of the user's output."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not interactive():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in a log file
    if ray.is_initialized():
        return
    quiet = not verbose()
    level = logging.ERROR if quiet else logging.DEBUG
    if cfg.trainer.address:
        ray.init(address=cfg.trainer.address, log_to_driver=True, logging_level=level)
    else:
        env = {"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"], "PYTHONWARNINGS": "ignore::FutureWarning"}
        if not cfg.trainer.use_gpu:
            import torch

            if not torch.cuda.is_available():
                env["DS_ACCELERATOR"] = "cpu"  # says so once here instead of a warning on every worker
        hook = "polyfid.distributed.launcher.pin_ray_address"
        ray.init(num_cpus=max(2, os.cpu_count() or 2), log_to_driver=True, logging_level=level,
                 runtime_env={"env_vars": env, "worker_process_setup_hook": hook})


def pin_ray_address() -> None:
    """Ray's worker set-up hook: name this cluster in RAY_ADDRESS inside every worker. Ray Train's clean-up
    actor looks its cluster up by address; with several local Ray instances on one machine (two runs side by
    side) it otherwise fails with "Found multiple active Ray instances" and prints a traceback."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def run_training(cfg: RunConfig, shutdown_ray: bool = True) -> dict[str, Any]:
    """Run pretraining or fine-tuning (cfg.finetune.source set) on Ray Train workers; returns a summary."""
    ensure_extension_cache()
    quiet_libraries()
    cfg.resolve_paths()
    get_step_function(cfg.trainer.mode)  # fail now for a mode without a step function
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    parent_uri = _fetch_parent(cfg)
    parent_meta = read_metadata(cfg.finetune.source) if cfg.finetune.source else {}
    _resolve_replay(cfg, parent_meta)
    _check_stores(cfg)
    save_config(cfg, out / "config.yaml")  # before anything runs

    # One MLflow run per output folder: a rerun of the same command continues it.
    run_file = out / "mlflow_run.json"
    tracker = Tracker(cfg.tracking.uri, enabled=cfg.tracking.enabled)
    previous_run = json.loads(run_file.read_text()).get("run_id") if run_file.exists() else None
    if previous_run:
        tracker.run_id = previous_run
        tracker.resume()
    else:
        tags = {"polyfid.mode": cfg.trainer.mode, "polyfid.kind": "finetune" if parent_uri else "pretrain"}
        if parent_uri:
            tags["polyfid.parent"] = parent_uri
            parent_run = (parent_meta.get("lineage") or {}).get("mlflow_run_id")
            if parent_uri.startswith("runs:/"):
                parent_run = parent_uri.split("/")[1]
            if parent_run:
                tags["polyfid.parent_run_id"] = parent_run
                if tracker.run_exists(parent_run):  # the dashboard nests the fine-tuning run under it
                    tags["mlflow.parentRunId"] = parent_run
        tracker.start(cfg.tracking.experiment, cfg.tracking.run_name or cfg.name, tags)
        if tracker.run_id:
            run_file.write_text(json.dumps({"run_id": tracker.run_id}))
        tracker.log_params(cfg.flat())
    tracker.log_artifact(out / "config.yaml")

    from ray.train import FailureConfig, LoggingConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    _init_ray(cfg)
    import torch

    use_gpu = torch.cuda.is_available() if cfg.trainer.use_gpu is None else cfg.trainer.use_gpu
    resources = {"CPU": cfg.trainer.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={"run": cfg.to_dict(), "mlflow_run_id": tracker.run_id, "parent_uri": parent_uri,
                           "live_progress": interactive()},
        scaling_config=ScalingConfig(
            num_workers=cfg.trainer.workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.trainer.placement,
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RayRunConfig(
            name=f"{cfg.name}-{int(time.time())}",
            storage_path=str(out / "ray"),
            failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
            logging_config=LoggingConfig(log_level="DEBUG" if verbose() else "ERROR"),
        ),
    )
    t0 = time.perf_counter()
    stop_file = out / STOP_FILE
    stop_file.unlink(missing_ok=True)
    previous = _on_sigterm(stop_file)
    try:
        trainer.fit()
    except BaseException:
        tracker.end("FAILED")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if shutdown_ray and not cfg.trainer.address:
            import ray

            ray.shutdown()
    wall = time.perf_counter() - t0
    if stop_file.exists():  # preempted: the workers wrote a checkpoint; the same command resumes
        stop_file.unlink()
        tracker.end("KILLED")
        summary = {"stopped": True, "checkpoints": str(out / "checkpoints"), "mlflow_run_id": tracker.run_id,
                   "wall_s": wall, "package": None}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    package = out / "package"
    if not (package / "polyfid.json").exists():
        tracker.end("FAILED")
        raise RuntimeError(f"training finished but wrote no package at {package}; see the worker logs above")
    tracker.log_artifact(package, "package")
    version = tracker.register(cfg.tracking.register_as) if cfg.tracking.register_as else None
    tracker.log_metrics({"train_wall_s": wall}, cfg.trainer.steps)
    forgetting = hint = None
    if cfg.finetune.source:
        forgetting = measure_forgetting(cfg.finetune.source, str(package), parent_meta)
        hint = forgetting_advice(forgetting, cfg.finetune.replay_fraction)
        if hint:
            log.warning(hint)
        if forgetting:
            tracker.log_metrics({f"forgetting/{fid}/{k}": v for fid, r in forgetting.items() for k, v in r.items()
                                 if isinstance(v, float)}, cfg.trainer.steps)
    if tracker.run_id and cfg.data.valid:  # parity plots, learning curves and final errors in the run
        from polyfid.evaluation.report import report_to_mlflow

        report_to_mlflow(str(package), cfg.data.valid, tracker.run_id, cfg.tracking.uri, out / "eval",
                         step=cfg.trainer.steps)
    tracker.end()
    summary = {
        "package": str(package),
        "mlflow_run_id": tracker.run_id,
        "tracking_uri": cfg.tracking.uri,
        "registered_model": cfg.tracking.register_as if version else None,
        "model_version": version,
        "wall_s": wall,
        "parent": parent_uri,
        "forgetting": forgetting,
        "forgetting_hint": hint,
    }
    for name in ("step0_validation.json", "best.json"):
        if (out / name).exists():
            summary[name.split(".")[0]] = json.loads((out / name).read_text())
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _on_sigterm(stop_file: Path):
    """On SIGTERM (a preemption), ask the workers to checkpoint and stop, instead of dying mid-step."""

    def handler(signum, frame):  # noqa: ARG001
        log.warning("SIGTERM: asking the workers to write a checkpoint and stop")
        stop_file.write_text("SIGTERM\n")

    return signal.signal(signal.SIGTERM, handler)


def _worker_entry(config: dict[str, Any]) -> None:
    """Ray Train entry; imported lazily on the worker so the driver stays light."""
    import logging as _logging

    _logging.basicConfig(level=_logging.WARNING, format="%(name)s: %(message)s")
    from polyfid.distributed.worker import train_loop_per_worker

    train_loop_per_worker(config)
