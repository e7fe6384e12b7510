"""DeepSpeed engine setup: ZeRO 0-2, bf16 on GPU and fp32 on CPU, torch Adam (no CUDA op compiled)."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from polyfid.distributed.config import ClusterConfig, ConfigError, TrainerConfig
from polyfid.distributed.loop.progress import quiet_stdout


log = logging.getLogger("polyfid.engine")
STALE_BUILD_S = 600.0  # the CPU op builds in about 35 s; a build lock this old was left by a killed build


def ensure_extension_cache() -> Path:
    """Keep the ops DeepSpeed compiles (on a GPU machine; on the CPU none, see skip_inference_comm_op) in one cache.

    torch guards a build with a bare `lock` file in the op's folder and waits, forever and silently, while it
    exists. A build that is killed (Ctrl-C or SIGKILL during a first run) leaves it behind, and every later run
    would hang at engine start-up. A lock older than STALE_BUILD_S is therefore removed, with a warning."""
    root = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                                      str(Path.home() / ".cache" / "polyfid" / "torch_extensions")))
    for lock in root.glob("*/lock"):
        try:
            age = time.time() - lock.stat().st_mtime
            if age > STALE_BUILD_S:
                lock.unlink()
                log.warning("removed %s, left %.0f min ago by a build of DeepSpeed's CPU op that was killed "
                            "(every run would have waited on it)", lock, age / 60)
        except FileNotFoundError:  # another process removed it first
            pass
    return root


def skip_inference_comm_op() -> None:
    """Tell DeepSpeed's CPU comm backend not to build and load its shared-memory op (deepspeed_shm_comm).

    The op serves only `inference_all_reduce`; a training step's all-reduce is torch.distributed's (gloo). Loading
    it cost about 4 s in every worker of every run, compiling it about 70 s on a machine's first run, and a
    killed compile left the lock file that hangs later runs (ensure_extension_cache)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def resolve_device(cfg: ClusterConfig) -> torch.device:
    """The device of this worker: a GPU when asked for (or available under auto), else the CPU."""
    use_gpu = torch.cuda.is_available() if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu and not torch.cuda.is_available():
        raise ConfigError("cluster.use_gpu=true but torch sees no CUDA device")
    if use_gpu:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_precision(cfg: TrainerConfig, device: torch.device) -> str:
    """fp32 on CPU, bf16 on GPU under auto; fp16 is refused on CPU."""
    p = cfg.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if p == "fp16" and device.type == "cpu":
        raise ConfigError("trainer.precision=fp16 is not supported on CPU; use fp32 or bf16")
    return p


def compute_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def deepspeed_config(cfg: TrainerConfig, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run."""
    return {
        "train_micro_batch_size_per_gpu": 1,  # batches are built to an atom budget, one per micro step
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "optimizer": {
            "type": "Adam",
            "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "torch_adam": True},
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # per-collective latencies, drained into the telemetry by drain_comm_time()
        "comms_logger": {"enabled": True, "verbose": False, "prof_all": True, "debug": False},
    }


def drain_comm_time() -> tuple[float, float]:
    """(seconds, bytes) in DeepSpeed collectives since the last call, waits for slower ranks included.

    DeepSpeed's comms logger records, per op, the running total of its timer; so the time of a window is
    the latest total, after which the op's timer is reset (which also keeps its record list short).
    """
    try:
        import importlib

        from deepspeed import comm

        comm_module = importlib.import_module("deepspeed.comm.comm")
    except ImportError:
        return 0.0, 0.0
    logger = getattr(comm, "comms_logger", None)
    if logger is None:
        return 0.0, 0.0
    ms, nbytes = 0.0, 0.0
    for name, sizes in logger.comms_dict.items():
        ms += max(max(rec[1]) for rec in sizes.values())
        nbytes += sum(float(size) * float(rec[0]) for size, rec in sizes.items())
        comm_module.timers(name).reset()
    logger.comms_dict.clear()
    return ms / 1000.0, nbytes


def lr_factor(step: int, cfg: TrainerConfig) -> float:
    """Linear warm-up, then cosine decay to lr_final_factor."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr_final_factor + (1 - cfg.lr_final_factor) * 0.5 * (1 + math.cos(math.pi * t))


def build_engine(
    model: torch.nn.Module,
    cfg: TrainerConfig,
    device: torch.device,
    params: Iterable | None = None,
    reptile_epsilon: float | None = None,
):
    """Wrap the model in a DeepSpeed engine; torch.distributed must already be initialised.

    With `reptile_epsilon` the engine's optimiser is plain SGD with lr ε annealed linearly to 0 and no
    clipping, so that a step with gradient θ − φ is exactly the Reptile outer update.
    """
    ensure_extension_cache()
    import deepspeed

    if device.type == "cpu":
        skip_inference_comm_op()
    precision = resolve_precision(cfg, device)
    model = model.to(device)
    trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    ds_config = deepspeed_config(cfg, precision)
    optimizer, schedule = None, (lambda s: lr_factor(s, cfg))
    if reptile_epsilon is not None:
        del ds_config["optimizer"]
        ds_config["gradient_clipping"] = 0.0
        ds_config["gradient_accumulation_steps"] = 1
        ds_config["zero_allow_untested_optimizer"] = True  # plain SGD, checked against Reptile in tests
        optimizer = torch.optim.SGD(trainable, lr=reptile_epsilon)
        schedule = lambda s: max(0.0, 1.0 - s / cfg.steps)  # noqa: E731
    with quiet_stdout():  # DeepSpeed prints "... built successfully" per rank for its CPU comm op
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=trainable,
            optimizer=optimizer,
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            dist_init_required=False,
        )
    return engine, precision
