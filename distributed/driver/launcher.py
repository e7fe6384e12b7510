"""The driver: resolve a copy of the config, open the MLflow run, run Ray Train workers, register the package.

The caller's RunConfig is never changed: `prepare` resolves a copy (absolute paths, data.oversample=top and
loss.force_prior=auto made explicit), saves it as config.yaml and hands it to the workers."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from polyfid.data_shards.schema import highest_rank
from polyfid.data_shards.store import Store
from polyfid.distributed.config import FORCE_PRIOR_AUTO, OVERSAMPLE_TOP, ConfigError, RunConfig, save_config
from polyfid.distributed.loop.checkpoint import STOP_FILE
from polyfid.distributed.loop.engine import ensure_extension_cache, resolve_device, resolve_precision
from polyfid.distributed.finetune.plan import FinetunePlan
from polyfid.distributed.finetune.scratch import compare_table, scratch_config
from polyfid.distributed.finetune.forgetting import forgetting_advice, measure_forgetting
from polyfid.distributed.driver.lock import run_lock
from polyfid.distributed.modes.registry import get_mode
from polyfid.distributed.loop.progress import interactive, quiet_libraries, verbose
from polyfid.infra.tracking import Tracker, registry_description
from polyfid.evaluation.report import report_to_mlflow
from polyfid.infra.resolve import resolve_package
from polyfid.infra.run_storage import RunStorage, check_output_url, is_remote
from polyfid.models.package import read_metadata
from polyfid.data_shards.named import open_store

log = logging.getLogger("polyfid.launcher")


def check_on_driver(cfg: RunConfig) -> RunConfig:
    """What can be checked before Ray starts: the stores open, data.oversample fits the run, and the device and
    precision make sense here. Returns a copy with data.oversample and loss.force_prior resolved; `cfg` is
    left as it was."""
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give at least one store (data.train=PATH[,PATH...])")
    cfg.check_oversample()
    opened = {}
    for key, paths in (("data.train", cfg.data.train), ("data.valid", cfg.data.valid), ("data.monitor", cfg.data.monitor)):
        for p in paths:
            try:
                opened[p] = open_store(p)
            except ValueError as err:  # not a polyfid store (a missing one is FileNotFoundError, naming the path)
                raise ConfigError(f"{key}: {err}") from err
    train = [opened[p] for p in cfg.data.train]
    resolved = copy.deepcopy(cfg)
    resolved.data.oversample = resolve_oversample(cfg, train)
    resolved.loss.force_prior = resolve_force_prior(cfg, train)
    import torch

    if cfg.cluster.address is None:  # a local cluster: its workers see the devices this process sees
        resolve_precision(cfg.trainer, resolve_device(cfg.cluster))
    elif cfg.cluster.use_gpu is False:
        resolve_precision(cfg.trainer, torch.device("cpu"))
    return resolved


def resolve_force_prior(cfg: RunConfig, train: list[Store]) -> dict[str, str]:
    """What loss.force_prior becomes: auto becomes {level: donor} for every level of data.train (`train`, opened) that has
    energies and no force labels, the donor being the level with the most force-labelled atoms (nothing in
    Reptile, whose tasks hold one level each). Then every level named is checked: a fidelity of data.train, and
    each donor has force labels. The saved config.yaml and MLflow params show what it became."""
    have = {f.name for s in train for f in s.fidelities}
    forced: dict[str, int] = {}
    for info in (info for s in train for info in s.shards):
        for name in info.forces:
            forced[name] = forced.get(name, 0) + info.n_atoms
    prior = cfg.loss.force_prior
    if prior == FORCE_PRIOR_AUTO:
        energies = {name for s in train for info in s.shards for name in info.energy}
        donor = max(sorted(forced), key=lambda f: forced[f]) if forced else None
        without = sorted(energies - set(forced))
        prior = {} if cfg.trainer.mode == "reptile" or donor is None else {name: donor for name in without}
        lent = ", ".join(f"{h} borrows {lo}'s forces" for h, lo in prior.items())
        log.info("loss.force_prior=auto: %s", lent or ("off (Reptile)" if cfg.trainer.mode == "reptile"
                                                        else "off (every level has forces)"))
    for high, low in prior.items():
        for name in (high, low):
            if name not in have:
                raise ConfigError(f"loss.force_prior names {name!r}, which no store of data.train holds; "
                                  f"their fidelities: {', '.join(sorted(have))}")
        if low not in forced:
            raise ConfigError(f"loss.force_prior: {low!r} has no force labels in data.train, so {high!r} has "
                              "nothing to borrow")
    return dict(prior)


def resolve_oversample(cfg: RunConfig, train: list[Store]) -> list[str]:
    """What data.oversample becomes: top becomes the stores of data.train (`train`, opened in that order) that hold the
    highest-rank fidelity, or nothing: in Reptile or replay runs, when those stores are all the stores, or when
    their atoms already reach data.oversample_fraction of the total. The saved config.yaml and MLflow params show
    what it became."""
    if cfg.data.oversample != [OVERSAMPLE_TOP]:
        return list(cfg.data.oversample)
    stores = dict(zip(cfg.data.train, train))
    top = highest_rank([f for s in stores.values() for f in s.fidelities]).name
    chosen = [p for p, s in stores.items() if top in {f.name for f in s.fidelities}]
    share = sum(stores[p].n_atoms for p in chosen) / max(sum(s.n_atoms for s in stores.values()), 1)
    why = ("Reptile" if cfg.trainer.mode == "reptile" else "replay" if cfg.finetune.replay_fraction > 0
           else "they are all the stores" if len(chosen) == len(stores)
           else f"they already hold {share:.0%} of the atoms" if share >= cfg.data.oversample_fraction else None)
    log.info("data.oversample=top: %s", f"off ({top}'s stores: {why})" if why else
             f"{len(chosen)} store(s) of {top} ({share:.1%} of the atoms) get {cfg.data.oversample_fraction:.0%} "
             "of each batch's atoms")
    return [] if why else chosen


@dataclasses.dataclass
class Prepared:
    """The run as the driver resolved it: `cfg` is the resolved copy; the caller's config is unchanged. `out` is
    the output folder, or the driver's staging folder of an output on object storage (`storage`)."""

    cfg: RunConfig
    out: Path
    plan: FinetunePlan | None
    storage: RunStorage | None = None


def prepare(cfg: RunConfig) -> Prepared:
    """Resolve a copy of the config, check everything that can fail early, plan the fine-tuning, and save the
    resolved config."""
    ensure_extension_cache()
    quiet_libraries()
    cfg = copy.deepcopy(cfg).resolve_paths()
    get_mode(cfg.trainer.mode)  # fail now for an unknown mode
    storage = output_storage(cfg.output, "driver", cfg.trainer.trace_dir)
    out = storage.local if storage else Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    if storage:  # a rerun continues the run's MLflow run; nothing else of the driver's is read back
        (out / "mlflow_run.json").unlink(missing_ok=True)
        storage.pull("mlflow_run.json")
    cfg = check_on_driver(cfg)
    plan = None
    if cfg.finetune.source:
        try:
            local = resolve_package(cfg.finetune.source, cfg.tracking.uri, out / "parent")
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"finetune.source: {err}") from err
        try:
            plan = FinetunePlan.build(cfg, [open_store(p) for p in cfg.data.train], local, cfg.finetune.source)
        except ValueError as err:  # the head or init_from asked for does not fit the parent and the data
            raise ConfigError(str(err)) from err
    save_config(cfg, out / "config.yaml")  # before anything runs
    if storage:
        storage.push("config.yaml")
    return Prepared(cfg, out, plan, storage)


def output_storage(output: str, role: str, trace_dir: str | None = None) -> RunStorage | None:
    """The RunStorage of an output on object storage (None for a local folder); a ConfigError names a bad URL."""
    check_output(output, trace_dir)
    return RunStorage(output, role) if is_remote(output) else None


def check_output(output: str, trace_dir: str | None = None) -> None:
    """A ConfigError for an output URL (or a trace_dir on object storage) that cannot hold a run."""
    if is_remote(trace_dir or "") and not is_remote(output):
        raise ConfigError(f"trainer.trace_dir={trace_dir} is on object storage: so must output be (it is {output})")
    if is_remote(output):
        try:
            check_output_url(output)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _init_ray(cfg: RunConfig) -> None:
    """Start or join Ray. Unless POLYFID_LOG_LEVEL=debug, Ray's own INFO/WARNING chatter (start-up, token
    set-up, scheduling) stays in Ray's session logs, out of the user's output."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray's own metrics exporter thread crashed a driver with SIGSEGV (OpenTelemetry's buildMetrics, Ray 2.60, seen
    # once in a test suite); polyfid's metrics go to MLflow. Set RAY_enable_metrics_collection=1 to keep Ray's.
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    if not interactive():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in a log file
    if ray.is_initialized():
        return
    quiet = not verbose()
    level = logging.ERROR if quiet else logging.DEBUG
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, log_to_driver=True, logging_level=level)
    else:
        env = {"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"], "PYTHONWARNINGS": "ignore::FutureWarning"}
        if not cfg.cluster.use_gpu:
            import torch

            if not torch.cuda.is_available():
                env["DS_ACCELERATOR"] = "cpu"  # says so once here instead of a warning on every worker
        hook = "polyfid.infra.rayhook.pin_ray_address"  # a light module: Ray imports it in every worker
        # address="local": a cluster of this run's own even when `ray start` left one on this machine (Ray would
        # join it and refuse num_cpus); cluster.address=auto joins that one on purpose
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), log_to_driver=True, logging_level=level,
                 runtime_env={"env_vars": env, "worker_process_setup_hook": hook})


_KEEP_RAY = False


@contextlib.contextmanager
def one_ray_cluster():
    """Run several trainings on one local Ray cluster: the first run starts it, and it is shut down on leaving.
    Each run then skips Ray's start-up and shut-down (about 13 s of a 4-step run's 50 s on 2 cores)."""
    global _KEEP_RAY
    outer, _KEEP_RAY = _KEEP_RAY, True
    try:
        yield
    finally:
        _KEEP_RAY = outer
        if not outer:
            import ray

            if ray.is_initialized():
                ray.shutdown()


def run_training(cfg: RunConfig, shutdown_ray: bool = True) -> dict[str, Any]:
    """Run pretraining or fine-tuning (cfg.finetune.source set) on Ray Train workers; returns a summary.
    `cfg` is not changed (the run's resolved copy is its config.yaml)."""
    output = copy.deepcopy(cfg).resolve_paths().output
    check_output(output)  # a bad URL fails here, before the lock
    with run_lock(output):  # one run per output folder; a lock (or lease) left by a dead driver is taken over
        run = prepare(cfg)
        tracker = track(run)
        try:
            wall = launch(run, tracker, shutdown_ray)
        except BaseException:
            tracker.end("FAILED")
            raise
        return finalize(run, tracker, wall)


def track(run: Prepared) -> Tracker:
    """The MLflow run of this output folder: a rerun of the same command continues it."""
    cfg, plan = run.cfg, run.plan
    run_file = run.out / "mlflow_run.json"
    tracker = Tracker(cfg.tracking.uri, enabled=cfg.tracking.enabled)
    previous_run = json.loads(run_file.read_text()).get("run_id") if run_file.exists() else None
    if previous_run:
        tracker.run_id = previous_run
        tracker.resume()
    else:
        tags = {"polyfid.mode": cfg.trainer.mode, "polyfid.kind": "finetune" if plan else "pretrain"}
        if plan:
            tags["polyfid.parent"] = plan.source_uri
            parent_run = (plan.parent_lineage or {}).get("mlflow_run_id")
            if plan.source_uri.startswith("runs:/"):
                parent_run = plan.source_uri.split("/")[1]
            if parent_run:
                tags["polyfid.parent_run_id"] = parent_run
                if tracker.run_exists(parent_run):  # the dashboard nests the fine-tuning run under it
                    tags["mlflow.parentRunId"] = parent_run
        tracker.start(cfg.tracking.experiment, cfg.tracking.run_name or cfg.name, tags)
        if tracker.run_id:
            run_file.write_text(json.dumps({"run_id": tracker.run_id}))
            if run.storage:
                run.storage.push(run_file.name)
        tracker.log_params(cfg.flat())
    tracker.log_artifact(run.out / "config.yaml")
    return tracker


def launch(run: Prepared, tracker: Tracker, shutdown_ray: bool) -> float:
    """Run the workers under Ray Train until they finish or a SIGTERM stops them; returns the wall time."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg, out = run.cfg, run.out
    _init_ray(cfg)
    import torch

    use_gpu = torch.cuda.is_available() if cfg.cluster.use_gpu is None else cfg.cluster.use_gpu
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={"run": cfg.to_dict(), "finetune_plan": run.plan.to_dict() if run.plan else None,
                           "mlflow_run_id": tracker.run_id, "live_progress": interactive(),
                           "base_dir": os.getcwd()},  # what the package's relative store paths are relative to
        scaling_config=ScalingConfig(num_workers=cfg.cluster.workers, use_gpu=use_gpu,
                                     resources_per_worker=resources, placement_strategy=cfg.cluster.placement),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RayRunConfig(
            name=f"{cfg.name}-{int(time.time())}",
            storage_path=str(out / "ray"),
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
            logging_config=LoggingConfig(log_level="DEBUG" if verbose() else "ERROR"),
        ),
    )
    t0 = time.perf_counter()
    stop_file = out / STOP_FILE
    stop_file.unlink(missing_ok=True)
    if run.storage:
        run.storage.remove(STOP_FILE)
    previous = _on_sigterm(stop_file, run.storage)
    try:
        trainer.fit()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if shutdown_ray and not _KEEP_RAY and not cfg.cluster.address:
            import ray

            ray.shutdown()
    return time.perf_counter() - t0


def finalize(run: Prepared, tracker: Tracker, wall: float) -> dict[str, Any]:
    """After the workers: register the package, measure forgetting, report to MLflow, write summary.json."""
    cfg, out, plan, storage = run.cfg, run.out, run.plan, run.storage
    if (out / STOP_FILE).exists():  # preempted: the workers wrote a checkpoint; the same command resumes
        (out / STOP_FILE).unlink()
        tracker.end("KILLED")
        summary = {"stopped": True, "checkpoints": f"{cfg.output}/checkpoints" if storage else str(out / "checkpoints"),
                   "mlflow_run_id": tracker.run_id, "wall_s": wall, "package": None}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if storage:
            storage.remove(STOP_FILE)
            storage.push("summary.json")
        return summary
    package = out / "package"
    if storage:  # rank 0 uploaded it from its node: register and evaluate the copy in the bucket
        shutil.rmtree(package, ignore_errors=True)
        for name in ("best.json", "step0_validation.json"):
            (out / name).unlink(missing_ok=True)
        for name in ("package", "best.json", "step0_validation.json"):
            storage.pull(name)
    if not (package / "polyfid.json").exists():
        tracker.end("FAILED")
        raise RuntimeError(f"training finished but wrote no package at {package}; see the worker logs above")
    tracker.log_artifact(package, "package")
    version = (tracker.register(cfg.tracking.register_as, description=registry_description(package))
               if cfg.tracking.register_as else None)
    tracker.log_metrics({"train_wall_s": wall}, cfg.trainer.steps)
    forgetting = hint = None
    if plan:
        forgetting = measure_forgetting(plan.source, str(package), {"lineage": plan.parent_lineage})
        hint = forgetting_advice(forgetting, plan.replay_fraction)
        if hint:
            log.warning(hint)
        if forgetting:
            tracker.log_metrics({f"forgetting/{fid}/{k}": v for fid, r in forgetting.items() for k, v in r.items()
                                 if isinstance(v, float)}, cfg.trainer.steps)
    if tracker.run_id and cfg.data.valid:  # parity plots, learning curves and final errors in the run
        report_to_mlflow(str(package), cfg.data.valid, tracker.run_id, cfg.tracking.uri, out / "eval",
                         step=cfg.trainer.steps)
    tracker.end()
    summary = {
        "package": f"{cfg.output}/package" if storage else str(package), "local_package": str(package),
        "mlflow_run_id": tracker.run_id, "tracking_uri": cfg.tracking.uri,
        "registered_model": cfg.tracking.register_as if version else None, "model_version": version,
        "wall_s": wall, "parent": plan.source_uri if plan else None, "parent_package": plan.source if plan else None,
        "forgetting": forgetting, "forgetting_hint": hint,
    }
    for name in ("step0_validation.json", "best.json"):
        if (out / name).exists():
            summary[name.split(".")[0]] = json.loads((out / name).read_text())
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if storage:
        storage.push("summary.json")
    return summary


def compare_with_scratch(cfg: RunConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """Train the same budget from a random init (scratch_config) after a fine-tuning whose summary is given;
    both packages' errors on the validation stores (else the training stores) go to compare_scratch.json."""
    scratch = run_training(scratch_config(cfg, read_metadata(summary["parent_package"])))
    where = cfg.data.valid or cfg.data.train
    table = compare_table({"fine-tuned": summary["local_package"], "from scratch": scratch["local_package"]}, where)
    out = {"finetuned": summary["package"], "scratch": scratch["package"], "data": where, "errors": table}
    storage = output_storage(cfg.output, "driver")
    (storage.local if storage else Path(cfg.output)).joinpath("compare_scratch.json").write_text(json.dumps(out, indent=2))
    if storage:
        storage.push("compare_scratch.json")
    return out


def _on_sigterm(stop_file: Path, storage: RunStorage | None = None):
    """On SIGTERM (a preemption), ask the workers to checkpoint and stop, instead of dying mid-step. With the
    output on object storage the stop file goes there too: the workers may run on other nodes."""

    def handler(signum, frame):  # noqa: ARG001
        log.warning("SIGTERM: asking the workers to write a checkpoint and stop")
        stop_file.write_text("SIGTERM\n")
        if storage:
            storage.put_text(STOP_FILE, "SIGTERM\n")

    return signal.signal(signal.SIGTERM, handler)


def _worker_entry(config: dict[str, Any]) -> None:
    """Ray Train entry; imported lazily on the worker so the driver stays light."""
    import logging as _logging

    _logging.basicConfig(level=_logging.WARNING, format="%(name)s: %(message)s")
    from polyfid.distributed.driver.worker import train_loop_per_worker

    train_loop_per_worker(config)
