"""Fused, chunked pair operations of the interaction layer, differentiable to any order.

The environment sum needs, for every pair p, a contraction of a per-pair vector with a per-atom matrix
gathered at the pair's index. Written with plain torch ops, autograd keeps the gathered [P, ν, width]
tensor (and its [C, P, width] counterpart for the tensor components) alive for the backward pass; on a
periodic box of 1,000 atoms that is hundreds of MB per layer. The three bilinear maps here work on
chunks of pairs and save only their inputs:

    gather_contract(s, y, idx)[p, o] = Σ_n s[p, n] · y[idx[p], n, o]
    gather_project(g, y, idx)[p, n]  = Σ_o g[p, o] · y[idx[p], n, o]
    scatter_outer(s, g, idx, A)[a, n, o] = Σ_{p: idx[p] = a} s[p, n] · g[p, o]

The derivative of each is built from the other two, so forces with create_graph=True (a force loss)
and higher derivatives work.

TorchScript cannot compile an autograd.Function. Under `torch.jit.script` (the metatomic export)
`gather_contract` and `scatter_outer` therefore take their plain-torch forms: the same maps, one gather and
one index_add, which autograd differentiates but which keep the [P, ν, width] gather for the backward pass.
"""

from __future__ import annotations

import os

import torch

# Elements of one gathered chunk [c, n, o]. On a CPU, 4 MB in float32 (cache-sized). On a GPU the chunk
# loop's kernel launches dominate small chunks, so a chunk is 256 MB there. POLYFID_PAIR_CHUNK overrides both.
_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 26}


def _chunk_elements(device: torch.device) -> int:
    override = os.environ.get("POLYFID_PAIR_CHUNK")
    if override:
        return int(override)
    return _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cpu"])


def _chunks(n_pairs: int, n: int, o: int, device: torch.device):
    step = max(1, _chunk_elements(device) // max(1, n * o))
    for start in range(0, n_pairs, step):
        yield start, min(start + step, n_pairs)


def _gather_contract(s: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    n_pairs, n = s.shape
    o = y.shape[2]
    out = torch.empty(n_pairs, o, dtype=y.dtype, device=y.device)
    for a, b in _chunks(n_pairs, n, o, idx.device):
        torch.bmm(s[a:b].unsqueeze(1), y.index_select(0, idx[a:b]), out=out[a:b].unsqueeze(1))
    return out


def _gather_project(g: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    n_pairs, o = g.shape
    n = y.shape[1]
    out = torch.empty(n_pairs, n, dtype=y.dtype, device=y.device)
    for a, b in _chunks(n_pairs, n, o, idx.device):
        # A batched matrix-vector bmm is 2-3x slower on CPU than this multiply-and-sum.
        torch.linalg.vecdot(y.index_select(0, idx[a:b]), g[a:b].unsqueeze(1), out=out[a:b])
    return out


def _scatter_outer(s: torch.Tensor, g: torch.Tensor, idx: torch.Tensor, n_atoms: int) -> torch.Tensor:
    n_pairs, n = s.shape
    o = g.shape[1]
    out = torch.zeros(n_atoms, n, o, dtype=g.dtype, device=g.device)
    for a, b in _chunks(n_pairs, n, o, idx.device):
        out.index_add_(0, idx[a:b], s[a:b].unsqueeze(2) * g[a:b].unsqueeze(1))
    return out


class _GatherContract(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, y, idx):
        ctx.save_for_backward(s, y, idx)
        return _gather_contract(s, y, idx)

    @staticmethod
    def backward(ctx, grad):
        s, y, idx = ctx.saved_tensors
        gs = gather_project(grad, y, idx) if ctx.needs_input_grad[0] else None
        gy = scatter_outer(s, grad, idx, y.shape[0]) if ctx.needs_input_grad[1] else None
        return gs, gy, None


class _GatherProject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, y, idx):
        ctx.save_for_backward(g, y, idx)
        return _gather_project(g, y, idx)

    @staticmethod
    def backward(ctx, grad):
        g, y, idx = ctx.saved_tensors
        gg = gather_contract(grad, y, idx) if ctx.needs_input_grad[0] else None
        gy = scatter_outer(grad, g, idx, y.shape[0]) if ctx.needs_input_grad[1] else None
        return gg, gy, None


class _ScatterOuter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, g, idx, n_atoms):
        ctx.save_for_backward(s, g, idx)
        return _scatter_outer(s, g, idx, n_atoms)

    @staticmethod
    def backward(ctx, grad):
        s, g, idx = ctx.saved_tensors
        gs = gather_project(g, grad, idx) if ctx.needs_input_grad[0] else None
        gg = gather_contract(s, grad, idx) if ctx.needs_input_grad[1] else None
        return gs, gg, None, None


def gather_contract(s: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[P, O]: Σ_n s[p, n] y[idx[p], n, o], for s [P, N], y [A, N, O], idx int64 [P]."""
    if torch.jit.is_scripting():
        return torch.bmm(s.unsqueeze(1), y.index_select(0, idx)).squeeze(1)
    return _GatherContract.apply(s, y, idx)


def gather_project(g: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[P, N]: Σ_o g[p, o] y[idx[p], n, o], for g [P, O], y [A, N, O], idx int64 [P]."""
    return _GatherProject.apply(g, y, idx)


def scatter_outer(s: torch.Tensor, g: torch.Tensor, idx: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """[A, N, O]: Σ_{p: idx[p]=a} s[p, n] g[p, o], for s [P, N], g [P, O], idx int64 [P]."""
    if torch.jit.is_scripting():
        out = torch.zeros(n_atoms, s.shape[1], g.shape[1], dtype=g.dtype, device=g.device)
        return out.index_add(0, idx, s.unsqueeze(2) * g.unsqueeze(1))
    return _ScatterOuter.apply(s, g, idx, int(n_atoms))
