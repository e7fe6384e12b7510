"""The Trainer: build the named parts once, then one loop that reads top to bottom.

    Trainer(cfg, ...).build().train()

Parts: the model and its engine, the mode (modes.py) and its stream, the validator with early stopping
(validation.py), the energy refit (energy_refit.py), the checkpointer (checkpoint.py), telemetry
(telemetry.py), the MLflow tracker and the progress display. torch.distributed is already initialised (by Ray Train, or by the caller) when it runs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from polyfid.data_shards.reader import ShardReader
from polyfid.data_shards.reference_fit import ReferenceFit, fit_stores
from polyfid.data_shards.schema import by_rank
from polyfid.data_shards.store import Store
from polyfid.distributed.loop.checkpoint import Checkpointer
from polyfid.distributed.config import RunConfig
from polyfid.distributed.loop.engine import build_engine, compute_dtype, resolve_device
from polyfid.distributed.loop.ema import EMA
from polyfid.distributed.loop.energy_refit import EnergyRefit
from polyfid.distributed.finetune.plan import FinetunePlan
from polyfid.distributed.loop.guard import Guard
from polyfid.distributed.modes.registry import get_mode
from polyfid.distributed.loop.packaging import write_package
from polyfid.distributed.loop.progress import make_progress, quiet_libraries
from polyfid.distributed.modes.multifidelity import StepContext, StreamSpec, collate
from polyfid.distributed.modes.stream import Collated
from polyfid.distributed.loop.telemetry import Telemetry, trace_name
from polyfid.infra.comm import all_reduce_host
from polyfid.infra.run_storage import RunStorage, is_remote
from polyfid.infra.tracking import Tracker
from polyfid.distributed.loop.validation import Validator
from polyfid.models.layout import LabelLayout
from polyfid.models.potential import Potential
from polyfid.data_shards.named import open_store
from polyfid.data_shards.store import set_shard_cache

log = logging.getLogger("polyfid.trainer")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_model(cfg: RunConfig, stores: list[Store], plan: FinetunePlan | None = None
                ) -> tuple[Potential, ReferenceFit | None]:
    """A fresh model for pretraining, or the parent package set up by the fine-tuning plan.

    A fresh model's reference energies, head scales and shifts come from one fit over all training stores
    together (data_shards/reference_fit.py), so they do not depend on how the data was split into stores.
    """
    torch.manual_seed(cfg.trainer.seed)
    if plan is not None:
        return plan.apply(stores, cfg.data.atom_budget), None
    fidelities = by_rank({f.name: f for s in stores for f in s.fidelities}.values())
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


def split_streams(cfg: RunConfig, stores: list, replay: list, plan: FinetunePlan | None):
    """(main stores, mixed-in stores, their share of each batch's atoms, data.train index of each or None):
    the fine-tuning replay stores, or the stores named in data.oversample taken out of the main stream."""
    if not cfg.data.oversample:
        return stores, replay, (plan.replay_fraction if plan else 0.0), None
    over = set(cfg.data.oversample)
    keep = [i for i, p in enumerate(cfg.data.train) if p not in over]
    mixed = [i for i, p in enumerate(cfg.data.train) if p in over]
    return [stores[i] for i in keep], [stores[i] for i in mixed], cfg.data.oversample_fraction, keep + mixed


class Trainer:
    """One training run on this rank: `build()` assembles the parts, `train()` runs the loop and writes the package."""

    def __init__(self, cfg: RunConfig, run_id: str | None = None, plan: FinetunePlan | None = None,
                 live_progress: bool | None = None) -> None:
        self.cfg, self.run_id, self.plan, self.live_progress = cfg, run_id, plan, live_progress
        self.step = 0

    def build(self) -> "Trainer":
        self.rank, self.world = rank_and_world()
        # An output on object storage: this rank works in its own staging folder and uploads (run_storage.py)
        self.storage = RunStorage.of(self.cfg.output, f"rank{self.rank}")
        self.trace_url = None
        if self.storage:
            self.cfg = copy.deepcopy(self.cfg)
            self.cfg.output = str(self.storage.local)
            if is_remote(self.cfg.trainer.trace_dir or ""):  # each rank appends locally and uploads its file
                self.trace_url, self.cfg.trainer.trace_dir = self.cfg.trainer.trace_dir, str(self.storage.local / "trace")
        cfg = self.cfg
        quiet_libraries()
        Path(cfg.output).mkdir(parents=True, exist_ok=True)  # the launcher makes it; a direct caller may not have
        if self.storage and self.rank == 0:  # the run's record so far (a resumed run appends to it)
            (Path(cfg.output) / "validation.jsonl").unlink(missing_ok=True)
            self.storage.pull("validation.jsonl")
        self.device = resolve_device(cfg.cluster)
        set_shard_cache(cfg.data.cache_dir)  # shards from object storage kept on this node (data.cache_dir)
        self.stores = [open_store(p) for p in cfg.data.train]
        self.valid = [open_store(p) for p in cfg.data.valid]
        self.model, self.fit = build_model(cfg, self.stores, self.plan)
        replay = [open_store(p) for p in self.plan.replay_stores] if self.plan and self.plan.replay_fraction > 0 else []
        fidelities = heads_in(self.model, self.stores + replay)  # label columns (fine-tuning data may have one)
        self.mode = get_mode(cfg.trainer.mode)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.engine, precision = build_engine(self.model, cfg.trainer, self.device, params=trainable,
                                              **self.mode.engine_options(cfg))
        dtype = compute_dtype(precision)
        reader = ShardReader.Config(atom_budget=cfg.data.atom_budget, shuffle_buffer=cfg.data.shuffle_buffer,
                                    seed=cfg.trainer.seed, loop=True, prefetch=cfg.data.prefetch,
                                    fetch_ahead=cfg.data.fetch_ahead)
        main, extra, fraction, index = split_streams(cfg, self.stores, replay, self.plan)
        spec = StreamSpec(main, extra, fraction, fidelities, self.model.fidelity_names, reader, self.rank, self.world,
                          index)
        self.stream = self.mode.stream(spec, cfg)
        self.checkpointer = Checkpointer(cfg.output, cfg.trainer.checkpoint_every, cfg.trainer.steps, self.run_id,
                                         self.rank, self.world, stop_check_every=cfg.trainer.log_every,
                                         storage=self.storage)
        self.checkpointer.on_saved = self.upload_records
        self.ema = EMA(self.engine.module, cfg.trainer.ema_decay) if cfg.trainer.ema_decay > 0 else None
        self.checkpointer.ema = self.ema  # checkpoints carry it; resume and rollback restore it
        self.step = self.checkpointer.resume(self.engine, self.stream)
        self.tracker = Tracker(cfg.tracking.uri, self.run_id, enabled=cfg.tracking.enabled and self.rank == 0)
        heads = list(LabelLayout.of(self.model.fidelity_names, fidelities).heads)
        self.guard = Guard(cfg.guard, self.rank)
        self.ctx = StepContext(self.engine, cfg.loss, fidelities, self.model.config.cutoff, dtype, self.device, heads,
                               self.mode.extra(spec, cfg), self.guard)
        if cfg.data.prefetch > 0:  # graphs are built on the read-ahead thread, not the training thread
            self.stream = Collated(self.stream, functools.partial(collate, ctx=self.ctx), cfg.data.prefetch)
        monitor = [open_store(p) for p in cfg.data.monitor]
        self.validator = Validator(cfg, self.valid, heads_in(self.model, self.valid), self.plan and self.plan.head,
                                   dtype, self.device, self.rank, self.world, self.tracker,
                                   monitor=(monitor, heads_in(self.model, monitor)))
        refit_heads = [self.plan.head] if self.plan else heads_in(self.model, self.stores)
        anchors = [open_store(p) for p in self.plan.anchors] if self.plan else []
        self.refit = EnergyRefit(cfg.trainer.energy_refit_every, cfg.trainer.steps, self.stores + anchors, refit_heads,
                                 cfg.data.atom_budget, dtype, self.device, self.rank, self.world,
                                 cfg.trainer.energy_refit_structures)
        if self.trace_url:  # this rank's trace so far (a resumed run appends to it)
            trace, saved = self.trace_files()
            trace.unlink(missing_ok=True)
            self.storage.fs.invalidate_cache()
            if self.storage.fs.exists(saved):
                trace.parent.mkdir(parents=True, exist_ok=True)
                self.storage.fs.get_file(saved, str(trace))
        self.telemetry = Telemetry(cfg.data.atom_budget, cfg.trainer.trace_dir, self.rank)
        self.progress = make_progress(cfg.trainer.steps, self.step, self.rank, self.live_progress,
                                      cfg.trainer.progress_every_s)
        return self

    def train(self) -> None:
        """The loop: read, step, log, validate, checkpoint; then the package (unless a stop was asked for)."""
        cfg, stopped = self.cfg.trainer, False
        self.validator.t0 = time.perf_counter()
        self.validator.at_start(self.engine.module, self.step)
        items = iter(self.stream)
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            item = next(items)
            t1 = time.perf_counter()
            self.guard.begin(self.step + 1)
            metrics = self.mode.step(item, self.ctx)  # skipped on every rank if the guard says so
            self.step += 1
            self.after_update()
            self.telemetry.record(self.step, self.stream, item, t1 - t0, time.perf_counter() - t0)
            if self.progress is not None:
                self.progress.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.log(metrics)
            if self.refit.due(self.step):
                self.refit_energies()
            validated = self.validator.due(self.step)
            if validated and self.validate():
                break
            if cfg.max_wall_s and self.time_up(validated):
                break
            stopped = self.checkpointer.after_step(self.engine, self.stream, self.step)
            if stopped:
                break
        if self.progress is not None:
            self.progress.close()
        if self.rank == 0 and not stopped:
            with self.weights() as module:
                write_package(self.validator.best(module, self.step), self.cfg, self.stores, self.run_id,
                              plan=self.plan, valid=self.valid, fit=self.fit,
                              output=self.storage.url if self.storage else None)
        self.upload_records(package=self.rank == 0 and not stopped)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def upload_records(self, package: bool = False) -> None:
        """With the output on object storage, rank 0 uploads the validation record (and the package), and every
        rank its trace file when trainer.trace_dir is on object storage."""
        if self.storage is None:
            return
        if self.trace_url:
            trace, saved = self.trace_files()
            if trace.exists():
                self.storage.fs.put_file(str(trace), saved)
        if self.rank != 0:
            return
        for name in ("validation.jsonl", "best.json", "step0_validation.json") + (("package",) if package else ()):
            self.storage.push(name)

    def trace_files(self) -> tuple[Path, str]:
        """This rank's trace file: in its staging folder, and its place on object storage (trainer.trace_dir)."""
        name = trace_name(self.rank)
        return Path(self.cfg.trainer.trace_dir) / name, f"{self.trace_url.rstrip('/')}/{name}"

    def time_up(self, validated: bool) -> bool:
        """Whether trainer.max_wall_s has passed, checked at each validation (every log window without validation
        stores) and agreed by all ranks; the run then ends as if this were its last step (best weights packaged)."""
        if not (validated or (not self.validator.valid and self.step % self.cfg.trainer.log_every == 0)):
            return False
        over = time.perf_counter() - self.validator.t0 >= self.cfg.trainer.max_wall_s
        if not all_reduce_host(torch.tensor([1.0 if over else 0.0])).item() > 0:
            return False
        self.validator.time_capped = True
        if self.rank == 0:
            log.warning("step %d: trainer.max_wall_s=%g s reached; the run ends here", self.step,
                        self.cfg.trainer.max_wall_s)
        return True

    def after_update(self) -> None:
        """The EMA follows each step that was taken; repeated skipped steps roll the run back."""
        if self.ema is not None and not self.guard.last_skipped:
            self.ema.update(self.engine.module)
        if self.guard.rollback_due(self.step):
            self.checkpointer.rollback(self.engine, self.step, self.cfg.guard.rollback_lr_factor)

    def weights(self):
        """The weights that are validated and packaged: the EMA when trainer.ema_decay > 0, else the live ones."""
        return self.ema.applied(self.engine.module) if self.ema is not None else contextlib.nullcontext(
            self.engine.module)

    def refit_energies(self) -> None:
        """The trained heads' reference energies refitted on the training data (the weights that are validated)."""
        with self.weights() as module:
            drift = self.refit(module, self.step)
        if self.rank == 0 and drift:
            self.tracker.log_metrics({f"energy_refit/{h}": v for h, v in drift.items()}, self.step)

    def validate(self) -> bool:
        """Validate at this step (the EMA weights, if any); True when early stopping ends the run."""
        with self.weights() as module:
            return self.validator(module, self.step)

    def log(self, step_metrics: Mapping[str, float]) -> None:
        """Telemetry of the window that ends at this step, with the step's metrics, to MLflow and the progress line."""
        metrics = {**step_metrics, **self.telemetry.flush(self.engine), **self.guard.metrics()}
        if self.rank == 0:
            self.tracker.log_metrics(metrics, self.step)
            if self.progress is not None:
                self.progress.set_metrics(loss=metrics["loss"], atoms_per_s=metrics["atoms_per_s"])
