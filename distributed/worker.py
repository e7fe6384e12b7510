"""The training loop that runs on every Ray Train worker: reader -> graph -> engine -> checkpoint -> package.

It reads top to bottom; the step itself is pluggable (steps.py). torch.distributed is already initialised
by Ray Train (gloo on CPU, NCCL on GPU) when this runs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from polyfid.data_shards.reader import ShardReader
from polyfid.data_shards.reference_fit import ReferenceFit, fit_stores
from polyfid.data_shards.store import Store
from polyfid.distributed.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from polyfid.distributed.config import RunConfig
from polyfid.distributed.engine import (
    all_gather_host, all_reduce_host, build_engine, compute_dtype, drain_comm_time, resolve_device,
)
from polyfid.evaluation.metrics import evaluate_batches
from polyfid.distributed.finetune import EarlyStopping, prepare_finetune_model
from polyfid.distributed.progress import make_progress, quiet_libraries
from polyfid.distributed.replay import MixedReader, split_budget
from polyfid.distributed.reptile import TaskStreams, list_tasks, task_weights
from polyfid.distributed.steps import StepContext, get_step_function
from polyfid.distributed.tracking import Tracker
from polyfid.models.package import save_package
from polyfid.models.potential import Potential

log = logging.getLogger("polyfid.worker")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_model(cfg: RunConfig, stores: list[Store]) -> tuple[Potential, ReferenceFit | None]:
    """A fresh model for pretraining, or the parent package (with its head set up) for fine-tuning.

    A fresh model's reference energies, head scales and shifts come from one fit over all training stores
    together (data_shards/reference_fit.py), so they do not depend on how the data was split into stores.
    """
    torch.manual_seed(cfg.trainer.seed)
    if cfg.finetune.source:
        return prepare_finetune_model(cfg, stores), None
    fids = {f.name: f for s in stores for f in s.fidelities}
    fidelities = sorted(fids.values(), key=lambda f: (f.rank, f.name))
    elements = sorted({int(z) for s in stores for z in s.elements})
    fit = fit_stores(stores, fidelities, elements)
    model = Potential(cfg.model, elements, fidelities, fit.energies)
    if cfg.model.scale_shift:
        for f in fidelities:
            model.set_scale_shift(f.name, fit.scale[f.name], fit.shift[f.name])
    return model, fit


def heads_in(model: Potential, stores: list[Store]) -> list[str]:
    """The model's fidelity names that any of the stores holds, in head order."""
    present = {f.name for s in stores for f in s.fidelities}
    return [n for n in model.fidelity_names if n in present]


def validate(model, cfg: RunConfig, valid: list[Store], fidelities: list[str], dtype, device, rank, world):
    """Errors on the validation stores; every rank takes its share and the sums are all-reduced."""
    reader = ShardReader(
        valid,
        ShardReader.Config(atom_budget=cfg.data.atom_budget, shuffle=False, loop=False, prefetch=0),
        rank=rank,
        world_size=world,
        fidelities=fidelities,
    )
    stats = evaluate_batches(model, reader, fidelities, dtype=dtype, device=device)
    stats.all_reduce()
    return stats.results()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point for Ray Train workers (and for plain torch.distributed processes in tests)."""
    cfg = RunConfig.from_dict(config["run"])
    run_id: str | None = config.get("mlflow_run_id")
    rank, world = rank_and_world()
    quiet_libraries()
    Path(cfg.output).mkdir(parents=True, exist_ok=True)  # the launcher makes it; a direct caller may not have
    device = resolve_device(cfg.trainer)
    stores = [Store.open(p) for p in cfg.data.train]
    valid = [Store.open(p) for p in cfg.data.valid]

    model, fit = build_model(cfg, stores)
    replay = [Store.open(p) for p in cfg.finetune.replay_stores] if cfg.finetune.replay_fraction > 0 else []
    # Label columns: the model's heads that the training data has (fine-tuning data may have just one).
    fidelities = heads_in(model, stores + replay)
    valid_fidelities = heads_in(model, valid)
    heads = [model.fidelity_index(n) for n in fidelities]
    trainable = [p for p in model.parameters() if p.requires_grad]
    reptile = cfg.trainer.mode == "reptile"
    engine, precision = build_engine(
        model, cfg.trainer, device, params=trainable, reptile_epsilon=cfg.reptile.epsilon if reptile else None
    )
    dtype = compute_dtype(precision)

    reader_cfg = ShardReader.Config(
        atom_budget=cfg.data.atom_budget,
        shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.trainer.seed,
        loop=True,
        prefetch=0 if reptile else cfg.data.prefetch,
    )
    extra: dict[str, Any] = {}
    if reptile:
        tasks = list_tasks(stores, model.fidelity_names)
        weights = task_weights(tasks, stores, cfg.reptile.task_weights)
        reader = TaskStreams(stores, tasks, weights, cfg.reptile, reader_cfg, rank, world, cfg.trainer.seed)
        extra = {"tasks": tasks, "inner_lr": cfg.reptile.inner_lr}
    elif replay:
        reader = mixed_reader(stores, replay, reader_cfg, cfg.finetune.replay_fraction, fidelities, rank, world)
    else:
        reader = ShardReader(stores, reader_cfg, rank=rank, world_size=world, fidelities=fidelities)
    ckpt_dir = Path(cfg.output) / "checkpoints"
    step = 0
    if latest_checkpoint(ckpt_dir) is not None:
        state = load_checkpoint(engine, ckpt_dir, reader, rank, world)
        step = int(state["step"])
        log.warning("rank %d resumed from %s at step %d", rank, ckpt_dir, step)

    tracker = Tracker(cfg.tracking.uri, run_id, enabled=cfg.tracking.enabled and rank == 0)
    step_fn = get_step_function(cfg.trainer.mode)
    ctx = StepContext(engine, cfg.loss, fidelities, model.config.cutoff, dtype, device, heads, extra)
    bar = make_progress(cfg.trainer.steps, step, rank, config.get("live_progress"), cfg.trainer.progress_every_s)
    trace = Trace(cfg.trainer.trace_dir, rank)
    stop_file = Path(cfg.output) / STOP_FILE
    batches = iter(reader)
    window = new_window()
    stopped = early = False
    finetune_head = getattr(model, "finetune_head", None)
    stopper = EarlyStopping(cfg.finetune.early_stopping_patience if finetune_head else 0, finetune_head or "",
                            cfg.loss.energy_weight, cfg.loss.forces_weight,
                            cfg.finetune.early_stopping_min_steps, cfg.finetune.early_stopping_smoothing)
    if valid and finetune_head and step == 0:  # the step-0 error, after the reference refit: report it
        res = validate(engine.module, cfg, valid, valid_fidelities, dtype, device, rank, world)
        stopper.update(res, engine.module, 0, keep=rank == 0)
        if rank == 0:
            tracker.log_metrics(flatten_valid(res), 0)
            (Path(cfg.output) / "step0_validation.json").write_text(json.dumps(res, indent=2))
            log.warning("step 0 (after the reference refit) validation: %s", short(res))
    while step < cfg.trainer.steps:
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        metrics = step_fn(batch, ctx)
        t2 = time.perf_counter()
        step += 1
        trace.write(step, reader, batch)
        window["atoms"] += atoms_in(batch)
        window["budget"] += cfg.data.atom_budget * (len(batch[1]) if isinstance(batch, tuple) else 1)
        window["wait"] += t1 - t0
        window["time"] += t2 - t0
        window["steps"] += 1
        if bar is not None:
            bar.update(1)
        if step % cfg.trainer.log_every == 0 or step == cfg.trainer.steps:
            metrics.update(throughput(window, engine))
            window = new_window()
            if rank == 0:
                tracker.log_metrics(metrics, step)
                if bar is not None:
                    bar.set_metrics(loss=metrics["loss"], atoms_per_s=metrics["atoms_per_s"])
        if valid and (step % cfg.trainer.valid_every == 0 or step == cfg.trainer.steps):
            res = validate(engine.module, cfg, valid, valid_fidelities, dtype, device, rank, world)
            if rank == 0:
                tracker.log_metrics(flatten_valid(res), step)
                log.warning("step %d validation: %s", step, short(res))
            early = stopper.update(res, engine.module, step, keep=rank == 0)
            if early:
                log.warning("early stopping at step %d: no improvement of %r in %d validations; best at step %d",
                            step, finetune_head, stopper.bad, stopper.best_step)
                break
        stopped = stop_requested(stop_file)
        if stopped or step % cfg.trainer.checkpoint_every == 0 or step == cfg.trainer.steps:
            save_checkpoint(engine, ckpt_dir, step, reader, run_id, rank)
        if stopped:
            log.warning("rank %d: stop requested; checkpoint written at step %d", rank, step)
            break

    if bar is not None:
        bar.close()
    if rank == 0 and not stopped:
        module = engine.module
        if stopper.best_state is not None:  # fine-tuning with validation: the best weights, not the last
            import copy

            module = copy.deepcopy(engine.module)
            stopper.restore_best(module)
            tracker.log_metrics({"best_step": stopper.best_step, "stopped_early": float(early)}, step)
            (Path(cfg.output) / "best.json").write_text(json.dumps(
                {"best_step": stopper.best_step, "best_score": stopper.best_score, "last_step": step,
                 "stopped_early": early}, indent=2))
        write_package(module, cfg, stores, run_id, parent=config.get("parent_uri"), valid=valid, fit=fit)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


STOP_FILE = "STOP"  # the driver writes it on SIGTERM; workers checkpoint and leave at the next step


def stop_requested(path: Path) -> bool:
    """Whether any rank sees the stop file; one scalar all-reduce so that all ranks agree."""
    flag = all_reduce_host(torch.tensor([1.0 if path.exists() else 0.0]))
    return bool(flag.item() > 0)


class Trace:
    """Optional per-rank JSON lines of what each step consumed: for exactness checks and debugging."""

    def __init__(self, trace_dir: str | None, rank: int) -> None:
        self.file = None
        if trace_dir:
            import ray

            Path(trace_dir).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(trace_dir) / f"rank{rank}.jsonl", "a")
            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
            self.base = {"rank": rank, "pid": os.getpid(), "node": node}

    def write(self, step: int, reader, item) -> None:
        if self.file is None:
            return
        batches = item[1] if isinstance(item, tuple) else [item]
        ids = [[int(s), int(i)] for b in batches for s, i in zip(b["store"], b["structure_id"])]
        rec = dict(self.base, step=step, epoch=getattr(reader, "epoch", None), ids=ids)
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()


def new_window() -> dict[str, float]:
    return {"atoms": 0.0, "budget": 0.0, "wait": 0.0, "time": 0.0, "steps": 0}


def atoms_in(item) -> float:
    """Atoms in what one step consumed: a batch, or Reptile's (task, batches)."""
    batches = item[1] if isinstance(item, tuple) else [item]
    return float(sum(b["n_atoms"].sum() for b in batches))


def throughput(window: dict[str, float], engine) -> dict[str, float]:
    """Telemetry over the last window: global and per-worker atoms/s, step time, data wait, budget fill."""
    comm_s, comm_bytes = drain_comm_time()
    mine = torch.tensor([window["atoms"], window["wait"], window["time"], window["budget"], comm_s, comm_bytes],
                        dtype=torch.float64)
    table = all_gather_host(mine)
    atoms, wait, busy, budget, comm, comm_bytes = table.sum(0).tolist()
    wall = float(table[:, 2].max())  # the slowest rank sets the pace
    out = {
        "atoms_per_s": atoms / max(wall, 1e-9),
        "step_time_s": wall / max(window["steps"], 1),
        "data_wait_fraction": wait / max(busy, 1e-9),
        "atom_budget_fill": atoms / max(budget, 1e-9),  # 1 - padding waste of atom-budget batching
        "comm_time_fraction": comm / max(busy, 1e-9),  # DeepSpeed collectives, waits for slower ranks included
        "comm_mb_per_step": comm_bytes / table.shape[0] / max(window["steps"], 1) / 1e6,
        "lr": float(engine.get_lr()[0]) if hasattr(engine, "get_lr") else float("nan"),
    }
    for r, row in enumerate(table.tolist()):
        out[f"atoms_per_s/worker{r}"] = row[0] / max(row[2], 1e-9)
    return out


def flatten_valid(res: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"valid/{k}/{fid}": v for fid, r in res.items() for k, v in r.items() if k != "n_structures"}


def short(res: dict[str, dict[str, float]]) -> str:
    return "; ".join(
        f"{fid} E {r.get('energy_mae', float('nan')) * 1000:.1f} meV F {r.get('forces_mae', float('nan')) * 1000:.1f} meV/Å"
        for fid, r in res.items()
    )


def mixed_reader(stores, replay, reader_cfg, fraction: float, fidelities, rank: int, world: int) -> MixedReader:
    """Target and replay readers splitting the atom budget by `fraction` (replay seeded apart from target)."""
    import dataclasses

    n_target, n_replay = split_budget(reader_cfg.atom_budget, fraction)
    t_cfg = dataclasses.replace(reader_cfg, atom_budget=n_target)
    r_cfg = dataclasses.replace(reader_cfg, atom_budget=n_replay, seed=reader_cfg.seed + 1)
    def own(ss):  # each reader reads the mix's fidelities that its stores hold
        return [f for f in fidelities if any(f in {x.name for x in s.fidelities} for s in ss)]

    return MixedReader(ShardReader(stores, t_cfg, rank=rank, world_size=world, fidelities=own(stores)),
                       ShardReader(replay, r_cfg, rank=rank, world_size=world, fidelities=own(replay)),
                       len(stores), fidelities)


def write_package(
    module: torch.nn.Module, cfg: RunConfig, stores: list[Store], run_id: str | None, parent: str | None = None,
    valid: list[Store] | None = None, fit: ReferenceFit | None = None,
) -> Path:
    """Save the trained model (in float32) as a package with lineage, at <output>/package."""
    import copy

    import polyfid

    model = copy.deepcopy(module).float().cpu()
    def entry(s: Store) -> dict:
        return {"path": s.path if isinstance(s.path, str) else str(s.path), "fingerprint": s.fingerprint}

    lineage = {
        "stores": [entry(s) for s in stores],
        "valid_stores": [entry(s) for s in valid or []],
        "replay": {"fraction": cfg.finetune.replay_fraction, "stores": list(cfg.finetune.replay_stores)}
        if cfg.finetune.source else None,
        "mlflow_run_id": run_id,
        "tracking_uri": cfg.tracking.uri,
        "polyfid_version": polyfid.__version__,
        "parent": parent or cfg.finetune.source,  # the URI the user gave, not the downloaded copy
        "mode": cfg.trainer.mode,
        "steps": cfg.trainer.steps,
        "reference_fit": fit.to_dict() if fit is not None else None,  # the joint fit over the training stores
    }
    if cfg.finetune.source:
        parent_meta = getattr(module, "package_metadata", {}) or {}
        lineage["parent_lineage"] = parent_meta.get("lineage")
    out = Path(cfg.output) / "package"
    save_package(out, model, lineage=lineage, extra={"config": cfg.to_dict()})
    return out


