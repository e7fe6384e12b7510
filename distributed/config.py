"""Typed run configuration: dataclasses loaded from YAML recipes with `--set key=value` overrides.

A config error names the key and the allowed keys or values. The resolved config is saved with every
run (`<output>/config.yaml`) and inside every model package.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from polyfid._util import split_list
from polyfid.data_shards.named import is_named_store
from polyfid.infra.resolve import resolve_tracking_uri
from polyfid.models.config import ModelConfig
from polyfid.models.pretrained import is_named

log = logging.getLogger(__name__)


OVERSAMPLE_TOP = "top"  # data.oversample: the stores of the highest-rank fidelity
FORCE_PRIOR_AUTO = "auto"  # loss.force_prior: levels without forces borrow the most force-labelled level's


class ConfigError(ValueError):
    """A configuration key or value is not allowed."""


def _choice(section: str, key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


@dataclasses.dataclass
class DataConfig:
    """Where the training and validation data live and how batches are built."""

    train: list[str] = dataclasses.field(default_factory=list)  # store paths or URLs, one per dataset
    valid: list[str] = dataclasses.field(default_factory=list)
    # Stores evaluated beside data.valid at every validation and logged (validation.jsonl "monitor", MLflow
    # monitor/...), never scored: no best-weights choice or early stop reads them. A benchmark's test split there
    # gives a test error against wall time (benchmarks/bench_peer_accuracy.py) without choosing on it.
    monitor: list[str] = dataclasses.field(default_factory=list)
    atom_budget: int = 1024  # at most this many atoms per batch on each rank
    shuffle_buffer: int = 2048  # structures held for shuffling
    prefetch: int = 2  # batches read ahead in a background thread
    fetch_ahead: int = 4  # object storage: shards of the following units fetched at once, ahead of their use
    # Stores of `train` read by a reader of their own that gets `oversample_fraction` of every batch's atoms,
    # instead of their share by size: a small high-level store beside a large low-level one (S1, BENCHMARKS.md).
    # `top` (OVERSAMPLE_TOP): the stores that hold the highest-rank fidelity, when they are not all the stores
    # and their atoms are below that share (the driver resolves it; launcher.resolve_oversample).
    oversample: list[str] = dataclasses.field(default_factory=list)
    oversample_fraction: float = 0.0
    # A node-local folder where each worker keeps the shards it read from object storage (s3://...), one file per
    # shard named by its checksum and verified on every read, so that later epochs read them locally.
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("train", "valid", "monitor", "oversample"):
            v = getattr(self, name)
            if v is None:  # `--set data.valid=` (empty): no stores
                setattr(self, name, [])
            elif isinstance(v, str):
                setattr(self, name, split_list(v))
        if self.atom_budget < 1:
            raise ConfigError(f"data.atom_budget must be positive, got {self.atom_budget}")
        if self.fetch_ahead < 0:
            raise ConfigError(f"data.fetch_ahead must be >= 0 (0: only the next shard), got {self.fetch_ahead}")
        if self.oversample and not 0.0 < self.oversample_fraction < 1.0:
            raise ConfigError(f"data.oversample_fraction must be in (0, 1) when data.oversample is set, "
                              f"got {self.oversample_fraction}")


@dataclasses.dataclass
class LossConfig:
    """The multi-fidelity loss: RMSE+MAE of energies (per atom) and forces, weighted per fidelity."""

    kind: str = "rmse+mae"  # rmse+mae | mse | mae
    energy_weight: float = 1.0
    forces_weight: float = 1.0
    per_atom_energy: bool = True  # compare energies divided by the atom count
    fidelity_weights: dict[str, float] = dataclasses.field(default_factory=dict)  # name -> factor on both terms
    # Force prior: {high: low} makes head `high` also fit `low`'s force labels, with weight force_prior_weight, on
    # the atoms that have `low` forces and no `high` forces (a level known from energies alone borrows the force
    # field of a cheaper one; S1 at corpus scale in BENCHMARKS.md). `auto` (FORCE_PRIOR_AUTO): every level of
    # data.train without force labels borrows from the level with the most force-labelled atoms.
    force_prior: dict[str, str] | str = dataclasses.field(default_factory=dict)
    force_prior_weight: float = 0.3

    def __post_init__(self) -> None:
        _choice("loss", "kind", self.kind, ("rmse+mae", "mse", "mae"))
        if self.force_prior is None:  # `--set loss.force_prior=`
            self.force_prior = {}
        if isinstance(self.force_prior, str) and self.force_prior != FORCE_PRIOR_AUTO:
            raise ConfigError(f"loss.force_prior must be {FORCE_PRIOR_AUTO} or map a fidelity to another, e.g. "
                              f"{{wb97x: gfn2_xtb}}; got {self.force_prior!r}")
        for high, low in (self.force_prior.items() if isinstance(self.force_prior, dict) else ()):
            if high == low:
                raise ConfigError(f"loss.force_prior maps {high!r} to itself")
        if self.force_prior_weight < 0:
            raise ConfigError(f"loss.force_prior_weight must be >= 0, got {self.force_prior_weight}")


@dataclasses.dataclass
class ClusterConfig:
    """Where training runs: the Ray cluster, the workers and their resources, and restarts."""

    workers: int = 2
    cpus_per_worker: float = 0.5  # Ray resources per worker; 0.5 avoids deadlocks on 2-core machines
    use_gpu: bool | None = None  # None: use a GPU when torch sees one
    address: str | None = None  # None: start a local Ray cluster; "auto" or HOST:PORT joins one
    placement: str = "PACK"  # Ray placement of workers: PACK (fill nodes) | SPREAD (one per node first)
    max_failures: int = 0  # Ray Train restarts of the worker group from the latest checkpoint

    def __post_init__(self) -> None:
        _choice("cluster", "placement", self.placement, ("PACK", "SPREAD"))
        if self.workers < 1:
            raise ConfigError(f"cluster.workers must be at least 1, got {self.workers}")


@dataclasses.dataclass
class TrainerConfig:
    """What training does: mode, steps, optimiser, precision, cadence of logs, validation and checkpoints."""

    mode: str = "multifidelity"  # multifidelity | reptile
    steps: int = 300
    lr: float = 2e-3
    lr_final_factor: float = 0.05  # cosine decay to lr * this
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    grad_accum: int = 1
    zero_stage: int = 1
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0
    log_every: int = 10  # also how often ranks agree on the stop file (one host sync per log window)
    progress_every_s: float = 30.0  # a plain progress line this often when the output is not a terminal
    valid_every: int = 100
    checkpoint_every: int = 100
    trace_dir: str | None = None  # if set, each rank appends (step, epoch, structure ids, node) per step there
    ema_decay: float = 0.0  # > 0: validate, early-stop and package an EMA of the weights with this decay (0.99)
    # Closed-form refit of the trained heads' reference energies on the training data (distributed/loop/energy_refit.py)
    # every this many steps and at the last step, before validating: a head's energy offset follows the data
    # instead of drifting with the readout. 0: off. The fine-tuning recipe sets it to its valid_every.
    energy_refit_every: int = 0
    energy_refit_structures: int = 2048  # training structures read per refit (all ranks together)
    # A time cap: the run ends at the first validation (or log window, without validation stores) after this many
    # seconds of its training loop, and packages its best weights as at its last step. 0: none.
    max_wall_s: float = 0.0

    def __post_init__(self) -> None:
        _choice("trainer", "mode", self.mode, ("multifidelity", "reptile"))
        _choice("trainer", "zero_stage", self.zero_stage, (0, 1, 2))
        _choice("trainer", "precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        if self.steps < 1:
            raise ConfigError(f"trainer.steps must be at least 1, got {self.steps}")
        if self.energy_refit_every < 0:
            raise ConfigError(f"trainer.energy_refit_every must be >= 0 (0: off), got {self.energy_refit_every}")
        if self.energy_refit_structures < 1:
            raise ConfigError(f"trainer.energy_refit_structures must be at least 1, got {self.energy_refit_structures}")
        if self.max_wall_s < 0:
            raise ConfigError(f"trainer.max_wall_s must be >= 0 seconds (0: no time cap), got {self.max_wall_s}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"trainer.ema_decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")


@dataclasses.dataclass
class GuardConfig:
    """What keeps a long run alive: skip a step whose loss is non-finite or spikes, roll back when that repeats."""

    skip_nonfinite: bool = True  # a non-finite loss on any rank: every rank skips the step
    spike_factor: float = 10.0  # a loss above this x the running median (and above 2x the window's largest
    # accepted loss, guard.TAIL_MARGIN) is skipped the same way; 0: off
    median_window: int = 100  # accepted steps in the running median and the largest accepted loss
    spike_warmup: int = 20  # accepted steps before spikes are judged
    rollback_after: int = 5  # this many skips within rollback_window steps: back to the last good checkpoint
    rollback_window: int = 100
    rollback_lr_factor: float = 0.5  # the learning rate is multiplied by this at each rollback

    def __post_init__(self) -> None:
        if self.spike_factor and self.spike_factor <= 1.0:
            raise ConfigError(f"guard.spike_factor must be above 1 (or 0: off), got {self.spike_factor}")
        if not 0.0 < self.rollback_lr_factor <= 1.0:
            raise ConfigError(f"guard.rollback_lr_factor must be in (0, 1], got {self.rollback_lr_factor}")
        if self.rollback_after < 1 or self.median_window < 1:
            raise ConfigError("guard.rollback_after and guard.median_window must be at least 1")


@dataclasses.dataclass
class ReptileConfig:
    """Meta-learning (S3): Reptile over tasks, a task being one (store, fidelity) pair."""

    inner_steps: int = 8  # k optimiser steps on one task per outer step, without communication
    inner_lr: float = 2e-3  # fresh Adam for every inner loop (chosen by benchmarks/bench_s3_reptile.py)
    epsilon: float = 1.0  # outer step size, annealed linearly to 0 over trainer.steps (same benchmark)
    task_weights: str = "uniform"  # uniform | size (by labelled structures)

    def __post_init__(self) -> None:
        _choice("reptile", "task_weights", self.task_weights, ("uniform", "size"))
        if self.inner_steps < 1:
            raise ConfigError(f"reptile.inner_steps must be at least 1, got {self.inner_steps}")
        if not 0 < self.epsilon <= 1:
            raise ConfigError(f"reptile.epsilon must be in (0, 1], got {self.epsilon}")


@dataclasses.dataclass
class TrackingConfig:
    """MLflow tracking: where, under which experiment, and which registered model name."""

    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"  # relative sqlite paths are resolved against the working directory
    experiment: str = "polyfid"
    run_name: str | None = None
    register_as: str | None = "polyfid"  # registered model name; None: do not register


@dataclasses.dataclass
class FinetuneConfig:
    """Fine-tuning: where from, which head, what to freeze."""

    source: str | None = None  # package path, pretrained:NAME, runs:/ID/package or models:/NAME/VERSION
    head: str | None = None  # fidelity to train; a new name adds a head initialised from the closest one
    init_from: str | None = None  # the parent head a new head starts from; default: the closest by rank
    freeze: str = "none"  # none | backbone
    refit_references: bool = True  # least-squares reference energies of the head on the target first
    rescale_head: bool = True  # a new head's scale becomes the target's force RMS (its predictions unchanged)
    replay_fraction: float = 0.0  # share of each batch's atoms drawn from the pretraining stores (anti-forgetting)
    replay_stores: list[str] = dataclasses.field(default_factory=list)  # default: the stores in the parent's lineage
    compare_scratch: bool = False  # also train the same budget from a random init and report both
    # The learning rate and warm-up of that scratch run (and of the demo's); None: the parent's pretraining ones.
    # The fine-tuning recipe sets the values its sweep chose for scratch (benchmarks/bench_finetune.py).
    scratch_lr: float | None = None
    scratch_warmup_steps: int | None = None

    def __post_init__(self) -> None:
        _choice("finetune", "freeze", self.freeze, ("none", "backbone"))
        if isinstance(self.replay_stores, str):
            self.replay_stores = split_list(self.replay_stores)
        if self.scratch_lr is not None and not self.scratch_lr > 0:
            raise ConfigError(f"finetune.scratch_lr must be positive (or null: the parent's), got {self.scratch_lr}")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ConfigError(f"finetune.replay_fraction must be in [0, 1), got {self.replay_fraction}")


@dataclasses.dataclass
class StoppingConfig:
    """Best-weights selection and early stopping on the validation stores: the same rules for every run, so that
    a fine-tuned model and its from-scratch comparison are chosen alike (finetune.compare_scratch, BENCHMARKS.md).

    The score is loss.energy_weight x energy MAE per atom (eV) + loss.forces_weight x force MAE (eV/Å) of the
    scored head (the mean over heads when several are scored), smoothed over validations.
    """

    patience: int = 0  # stop after this many validations without improvement; 0: run every step
    min_steps: int = 0  # validations before this step never count against the patience
    smoothing: float = 0.5  # the score is an exponential average keeping this much of the previous one
    keep_best: bool = True  # package the best-validated weights (best.json says which step), else the last
    head: str | None = None  # the head scored; default: the fine-tuned head, else every head the valid data holds
    converged_fall: float = 0.03  # converged: the best validation force MAE fell less than this over the window
    converged_window: float = 0.2  # the last fraction of the steps that converged_fall looks at

    def __post_init__(self) -> None:
        if not 0.0 <= self.smoothing < 1.0:
            raise ConfigError(f"stopping.smoothing must be in [0, 1), got {self.smoothing}")
        if self.patience < 0:
            raise ConfigError(f"stopping.patience must be >= 0 (0: never stop early), got {self.patience}")
        if self.min_steps < 0:
            raise ConfigError(f"stopping.min_steps must be >= 0, got {self.min_steps}")
        if not self.converged_fall > 0:
            raise ConfigError(f"stopping.converged_fall must be > 0 (0.03: a 3% fall), got {self.converged_fall}")
        if not 0 < self.converged_window < 1:
            raise ConfigError(f"stopping.converged_window must be in (0, 1), got {self.converged_window}")


@dataclasses.dataclass
class RunConfig:
    """A whole run. Sections map one to one onto the YAML recipe."""

    name: str = "polyfid"
    output: str = "runs/polyfid"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    reptile: ReptileConfig = dataclasses.field(default_factory=ReptileConfig)
    guard: GuardConfig = dataclasses.field(default_factory=GuardConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    stopping: StoppingConfig = dataclasses.field(default_factory=StoppingConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        return _from_dict(cls, _moved_keys(d), "")

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, v: Any) -> None:
            if isinstance(v, dict) and v and all(isinstance(k, str) for k in v) and not prefix.endswith("weights"):
                for k, x in v.items():
                    walk(f"{prefix}.{k}" if prefix else k, x)
            else:
                out[prefix] = v

        walk("", self.to_dict())
        return out

    def check_oversample(self) -> None:
        """data.oversample (on resolved paths): stores of data.train, not all of them, in multi-fidelity training
        without replay."""
        if OVERSAMPLE_TOP in self.data.oversample and self.data.oversample != [OVERSAMPLE_TOP]:
            raise ConfigError(f"data.oversample={OVERSAMPLE_TOP} stands alone; got {self.data.oversample}")
        if self.data.oversample == [OVERSAMPLE_TOP]:
            return  # the driver resolves it against the stores (nothing where it does not apply)
        unknown = [p for p in self.data.oversample if p not in self.data.train]
        if unknown:
            raise ConfigError(f"data.oversample names stores that are not in data.train: {unknown}")
        if self.data.oversample and len(self.data.oversample) == len(self.data.train):
            raise ConfigError("data.oversample names every store of data.train; leave at least one out")
        if self.data.oversample and (self.trainer.mode == "reptile" or self.finetune.replay_fraction > 0):
            raise ConfigError("data.oversample works in multi-fidelity training without replay; "
                              f"here trainer.mode={self.trainer.mode}, finetune.replay_fraction="
                              f"{self.finetune.replay_fraction}")

    def resolve_paths(self, base: str | os.PathLike | None = None) -> "RunConfig":
        """Make local paths absolute (Ray workers run elsewhere) and sqlite URIs absolute."""
        base = Path(base or os.getcwd())

        def absol(p: str) -> str:  # URLs and named stores (corpus:NAME) stay as they are
            return p if "://" in p or is_named_store(p) else str((base / p).resolve())

        self.output = absol(self.output)
        self.data.train = [absol(p) for p in self.data.train]
        self.data.valid = [absol(p) for p in self.data.valid]
        self.data.monitor = [absol(p) for p in self.data.monitor]
        self.data.oversample = [p if p == OVERSAMPLE_TOP else absol(p) for p in self.data.oversample]
        self.finetune.replay_stores = [absol(p) for p in self.finetune.replay_stores]
        if self.trainer.trace_dir:
            self.trainer.trace_dir = absol(self.trainer.trace_dir)
        if self.finetune.source and ":/" not in self.finetune.source and not is_named(self.finetune.source):
            self.finetune.source = absol(self.finetune.source)
        self.tracking.uri = resolve_tracking_uri(self.tracking.uri, base)
        return self


MOVED_TO_CLUSTER = tuple(f.name for f in dataclasses.fields(ClusterConfig))  # trainer.X before the split


MOVED_TO_STOPPING = {"early_stopping_patience": "patience", "early_stopping_min_steps": "min_steps",
                     "early_stopping_smoothing": "smoothing"}  # finetune.X before `stopping:` served every run


def _moved_keys(d: dict[str, Any]) -> dict[str, Any]:
    """Accept recipes, overrides and saved configs written before `cluster:` was split from `trainer:`
    (`trainer.workers` is read as `cluster.workers`) and before `stopping:` was split from `finetune:`
    (`finetune.early_stopping_patience` is read as `stopping.patience`), with a warning."""
    finetune = d.get("finetune")
    if isinstance(finetune, dict) and set(finetune) & set(MOVED_TO_STOPPING):
        d, finetune = dict(d), dict(finetune)
        stopping = dict(d.get("stopping") or {})
        for old, new in MOVED_TO_STOPPING.items():
            if old in finetune:
                log.warning("finetune.%s is now stopping.%s; reading it there", old, new)
                stopping.setdefault(new, finetune.pop(old))
        d["finetune"], d["stopping"] = finetune, stopping
    trainer = d.get("trainer")
    if not isinstance(trainer, dict) or not set(trainer) & set(MOVED_TO_CLUSTER):
        return d
    d, trainer = dict(d), dict(trainer)
    cluster = dict(d.get("cluster") or {})
    for k in MOVED_TO_CLUSTER:
        if k in trainer:
            log.warning("trainer.%s is now cluster.%s; reading it there", k, k)
            cluster.setdefault(k, trainer.pop(k))
    d["trainer"], d["cluster"] = trainer, cluster
    return d


def _did_you_mean(unknown: list[str]) -> str:
    """'; did you mean cluster.workers?' for a key that is close to one in any section."""
    known = {f"{sec}.{f.name}": f.name for sec, t in typing.get_type_hints(RunConfig).items()
             if dataclasses.is_dataclass(t) for f in dataclasses.fields(t)}
    hits = [dotted for k in unknown for m in difflib.get_close_matches(k, set(known.values()), n=1, cutoff=0.75)
            for dotted, name in known.items() if name == m]
    return f"; did you mean {' or '.join(hits)}?" if hits else ""


def _to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_dict(v) for k, v in obj.items()}
    return obj


def _from_dict(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {', '.join((where + '.' if where else '') + k for k in unknown)}; "
            f"allowed: {', '.join(sorted(fields))}{_did_you_mean(unknown)}"
        )
    kwargs = {}
    for k, v in d.items():
        t = hints[k]
        key = f"{where}.{k}" if where else k
        if dataclasses.is_dataclass(t):
            kwargs[k] = _from_dict(t, v or {}, key) if not isinstance(v, t) else v
        else:
            kwargs[k] = _coerce(t, v, key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where or 'config'}: {e}") from e


def _coerce(t: Any, v: Any, key: str) -> Any:
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if v is None:
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, v, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={v!r} does not match {t}")
    if origin is list:
        if isinstance(v, str):
            v = split_list(v)
        return [_coerce(args[0], x, key) for x in v] if args else list(v)
    if origin is dict:
        if not isinstance(v, dict):
            raise ConfigError(f"{key} must be a mapping, got {v!r}")
        return {str(k): _coerce(args[1], x, key) for k, x in v.items()} if args else dict(v)
    if t is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0"):
            return v.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}={v!r} must be true or false")
    if t in (int, float):
        if isinstance(v, bool):
            raise ConfigError(f"{key}={v!r} must be a number")
        try:
            out = t(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={v!r} must be {'an integer' if t is int else 'a number'}") from None
        if t is int and isinstance(v, float) and v != out:
            raise ConfigError(f"{key}={v!r} must be an integer")
        return out
    if t is str:
        if isinstance(v, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {v!r}")
        return str(v)
    return v


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings to a nested dict; values are parsed as YAML scalars."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) == 2 and parts[0] == "trainer" and parts[1] in MOVED_TO_CLUSTER:
            log.warning("--set trainer.%s is now cluster.%s; setting that", parts[1], parts[1])
            parts[0] = "cluster"
        if len(parts) == 2 and parts[0] == "finetune" and parts[1] in MOVED_TO_STOPPING:
            log.warning("--set finetune.%s is now stopping.%s; setting that", parts[1], MOVED_TO_STOPPING[parts[1]])
            parts = ["stopping", MOVED_TO_STOPPING[parts[1]]]
        node = d
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        value = yaml.safe_load(raw) if raw.strip() else None
        if isinstance(value, str) and "," in value and parts[-1] in ("train", "valid", "monitor"):
            value = split_list(value)
        node[parts[-1]] = value
    return d


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML recipe (optional), apply overrides, validate."""
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        d = yaml.safe_load(p.read_text()) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
    d = apply_overrides(_moved_keys(d), overrides or [])
    return RunConfig.from_dict(d)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return p
