"""Run a function on N real torch.distributed ranks (gloo, CPU) on a free local port."""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple, err_dir: str,
           environ: dict[str, str]) -> None:
    os.environ.clear()  # the caller's environment now, not the fork server's from when it started
    os.environ.update(environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        # Leave together: a rank that tears gloo down while the other still talks to it can make that one abort
        # ("terminate called without an active exception", SIGABRT) on a loaded machine.
        dist.barrier()
    except BaseException:
        Path(err_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


# Ranks are forked from one fork server that imported these once for the whole session, instead of each rank
# importing them afresh (about 12 s of CPU per rank: torch, DeepSpeed, which pulls in MLflow, and torch._dynamo,
# which the first optimizer pulls in). The server imports no test module and starts no thread.
PRELOAD = ["torch", "torch._dynamo", "deepspeed", "mlflow", "polyfid.distributed.driver.worker"]


def spawn(fn: Callable, world_size: int, *args: Any, tmp: str | os.PathLike) -> None:
    """Run fn(rank, world_size, *args) on world_size processes; re-raise the first rank's error."""
    port = free_port()
    multiprocessing.set_forkserver_preload(PRELOAD)
    try:
        mp.start_processes(_entry, args=(fn, world_size, port, args, str(tmp), dict(os.environ)), nprocs=world_size,
                           start_method="forkserver")
    except Exception as e:
        errs = sorted(Path(tmp).glob("rank*.err"))
        detail = "\n".join(p.read_text() for p in errs)
        raise AssertionError(f"a rank failed:\n{detail}") from e
