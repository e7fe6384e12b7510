"""Host-side collectives: all-reduce and all-gather of small CPU tensors across ranks, through the GPU under
NCCL (which has no CPU backend), and a no-op without torch.distributed. The loop, validation and evaluation use
them; nothing here imports DeepSpeed or Ray."""

from __future__ import annotations

import torch


def all_reduce_host(t: torch.Tensor, op=None) -> torch.Tensor:
    """All-reduce a small host tensor in place, through the GPU when the process group is NCCL (which has no
    CPU backend). A no-op without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return t
    op = dist.ReduceOp.SUM if op is None else op
    if dist.get_backend() == "nccl":
        dev = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(dev, op=op)
        t.copy_(dev.cpu())
    else:
        dist.all_reduce(t, op=op)
    return t


def all_gather_host(t: torch.Tensor) -> torch.Tensor:
    """All ranks' copies of a small host tensor, stacked [world, ...] (through the GPU under NCCL)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return t[None]
    src = t.to(torch.device("cuda", torch.cuda.current_device())) if dist.get_backend() == "nccl" else t
    rows = [torch.zeros_like(src) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, src)
    return torch.stack(rows).cpu()
