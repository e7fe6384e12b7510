"""Cartesian direction tensors of each pair and the rotation invariants built from their sums (S2).

A rank-l tensor is traceless and symmetric, so a pair stores only its unique components ("compact"):
1, 3, 6 and 10 numbers for l = 0..3. After the environment sum they are expanded to full 3^l arrays.

`TensorAlgebra` holds the index tables as buffers, so that they follow the model's device, and its methods
compile with TorchScript (the metatomic export). The free functions below use one instance per device.
"""

from __future__ import annotations

import itertools
from typing import List

import torch

# The S2 invariant set: (name, degree = number of tensors multiplied, highest rank used).
# The set for (n_max, l_max) is every entry with degree <= n_max and rank <= l_max; this gives the
# published counts (4,3)->13, (4,2)->6, (3,3)->7, (3,2)->5.
INVARIANTS: tuple[tuple[str, int, int], ...] = (
    ("s", 1, 0),
    ("v.v", 2, 1),
    ("Q:Q", 2, 2),
    ("T:T", 2, 3),
    ("vQv", 3, 2),
    ("trQ3", 3, 2),
    ("QTT", 3, 3),  # Q_ij T_jkl T_ikl
    ("Tvvv", 4, 3),  # T_ijk v_i v_j v_k
    ("|Qv|2", 4, 2),
    ("vTTv", 4, 3),  # v_i T_ikl T_jkl v_j
    ("QQTT", 4, 3),  # (QQ)_ij T_ikl T_jkl
    ("QTTQ", 4, 3),  # |Q_ij T_ijk|^2
    ("TTTT", 4, 3),  # (T_ijk T_ijl)(T_abk T_abl)
)

_UNIQUE = {l: list(itertools.combinations_with_replacement(range(3), l)) for l in range(4)}
N_COMPONENTS = {l: len(_UNIQUE[l]) for l in range(4)}  # 1, 3, 6, 10
_OFFSETS = {l: sum(N_COMPONENTS[m] for m in range(l)) for l in range(4)}


def n_components(l_max: int) -> int:
    """Compact components of all tensors up to rank l_max."""
    return sum(N_COMPONENTS[l] for l in range(l_max + 1))


def invariant_names(n_max: int, l_max: int) -> list[str]:
    """Names of the S2 invariants for products of up to n_max tensors of rank up to l_max."""
    if not 1 <= n_max <= 4 or not 0 <= l_max <= 3:
        raise ValueError(f"invariants exist for n_max in 1..4 and l_max in 0..3, got n_max={n_max}, l_max={l_max}")
    return [name for name, degree, rank in INVARIANTS if degree <= n_max and rank <= l_max]


def invariant_count(n_max: int, l_max: int) -> int:
    """Number of S2 invariants for (n_max, l_max), e.g. 13 for (4, 3)."""
    return len(invariant_names(n_max, l_max))


def _expand_index(l: int) -> torch.Tensor:
    """For every full index (i, j, ...) of a rank-l tensor, the position of its compact component."""
    position = {key: n for n, key in enumerate(_UNIQUE[l])}
    full = [position[tuple(sorted(ix))] for ix in itertools.product(range(3), repeat=l)]
    return torch.tensor(full, dtype=torch.int64)


def _multiplicity(l: int) -> torch.Tensor:
    """How many full index tuples each compact component of a rank-l symmetric tensor stands for."""
    return torch.tensor([float(len(set(itertools.permutations(key)))) for key in _UNIQUE[l]])




def _index_columns(l: int) -> list[torch.Tensor]:
    """The l index columns (int64 [N_COMPONENTS[l]] each) of the compact components of rank l."""
    return [torch.tensor(c, dtype=torch.int64) for c in zip(*_UNIQUE[l])]


def _uses(names: List[str], keys: List[str]) -> bool:
    """True if any of `keys` is in `names`."""
    for key in keys:
        if key in names:
            return True
    return False


class TensorAlgebra(torch.nn.Module):
    """Direction tensors, their expansion and their invariants, with the index tables as buffers.

    The buffers are not persistent: they are rebuilt from `_UNIQUE`, so packages and checkpoints do not
    hold them. Every method compiles with TorchScript.
    """

    def __init__(self) -> None:
        super().__init__()
        self.offsets: List[int] = [_OFFSETS[l] for l in range(4)] + [n_components(3)]
        tables = {
            "pair_k": _index_columns(2)[0], "pair_l": _index_columns(2)[1],
            "triple_i": _index_columns(3)[0], "triple_j": _index_columns(3)[1], "triple_k": _index_columns(3)[2],
            "expand2": _expand_index(2), "expand3": _expand_index(3),
            "rows_ij": torch.tensor([3 * i + j for i, j in _UNIQUE[2]]),  # rows (i <= j) of T reshaped to [(ij), k]
            "mult2": _multiplicity(2), "mult3": _multiplicity(3),
        }
        for name, table in tables.items():
            self.register_buffer(name, table, persistent=False)

    def direction_tensors(self, rhat: torch.Tensor, l_max: int) -> torch.Tensor:
        """Compact traceless symmetric tensors of unit vectors rhat [P, 3] for l = 0..l_max → [P, C]."""
        parts = [torch.ones_like(rhat[:, :1])]
        if l_max >= 1:
            parts.append(rhat)
        if l_max >= 2:
            i, j = self.pair_k, self.pair_l
            delta = (i == j).to(rhat.dtype)
            parts.append(rhat[:, i] * rhat[:, j] - delta / 3.0)
        if l_max >= 3:
            i, j, k = self.triple_i, self.triple_j, self.triple_k
            d_ij, d_ik, d_jk = (i == j).to(rhat.dtype), (i == k).to(rhat.dtype), (j == k).to(rhat.dtype)
            ri, rj, rk = rhat[:, i], rhat[:, j], rhat[:, k]
            parts.append(ri * rj * rk - (d_ij * rk + d_ik * rj + d_jk * ri) / 5.0)
        return torch.cat(parts, dim=1)

    def split(self, x: torch.Tensor, l_max: int) -> List[torch.Tensor]:
        """Full tensors, components first, from compact ones x [C, N]: [s [N], v [3,N], Q [3,3,N], T [3,3,3,N]]."""
        n, o = x.shape[1], self.offsets
        out = [x[0]]
        if l_max >= 1:
            out.append(x[o[1] : o[2]])
        if l_max >= 2:
            out.append(x[o[2] : o[3]].index_select(0, self.expand2).reshape(3, 3, n))
        if l_max >= 3:
            out.append(x[o[3] : o[4]].index_select(0, self.expand3).reshape(3, 3, 3, n))
        return out

    def norms(self, x: torch.Tensor, l_max: int, eps: float = 1e-6) -> torch.Tensor:
        """HIP-NN-TS invariants of x [C, N]: s and sqrt(|t_l|² + eps), l = 1..l_max → [l_max+1, N]."""
        tensors = self.split(x, l_max)
        norms = [tensors[0]]
        for l in range(1, l_max + 1):
            t = tensors[l]
            norms.append(torch.sqrt((t * t).sum(dim=[d for d in range(l)]) + eps))
        return torch.stack(norms, dim=0)

    def hop(self, x: torch.Tensor, names: List[str], l_max: int) -> torch.Tensor:
        """HIP-HOP-NN invariants named in `names` of compact tensor sums x [C, N] → [len(names), N].

        Components come first and the N = atoms × features axis last, so every contraction is a broadcast
        multiply and a sum over long contiguous rows (fast on CPU and GPU, unlike batches of 3×3 matrix
        products). A full contraction of two symmetric tensors is a sum over their compact components
        weighted by multiplicities (Q:Q has 6 terms, not 9; M_kl = T_ijk T_ijl sums 6 (ij), not 9), which
        roughly halves the work of the rank-3 invariants. Only the intermediates that `names` need are built.
        """
        m2 = self.mult2.to(x.dtype).unsqueeze(1)
        m3 = self.mult3.to(x.dtype).unsqueeze(1)
        pk, pl = self.pair_k, self.pair_l
        t = self.split(x, l_max)
        empty = x[:0]
        s = t[0]
        v = t[1] if l_max >= 1 else empty
        q = t[2] if l_max >= 2 else empty
        qc, tc = x[4:10], x[10:20]  # compact Q [6, N] and T [10, N] (empty when l_max is lower)
        t6, m6, vv6, qq6 = empty, empty, empty, empty
        if _uses(names, ["QTT", "vTTv", "QQTT", "QTTQ", "TTTT"]):  # T_(ij)k over the 6 rows i <= j: [6, 3, N]
            t6 = t[3].reshape(9, 3, x.shape[1]).index_select(0, self.rows_ij)
        if _uses(names, ["QTT", "vTTv", "QQTT", "TTTT"]):  # compact M_kl = T_ijk T_ijl
            m6 = ((m2.unsqueeze(1) * t6)[:, pk] * t6[:, pl]).sum(0)
        if _uses(names, ["vQv", "vTTv"]):  # compact v_k v_l
            vv6 = v[pk] * v[pl]
        if _uses(names, ["trQ3", "QQTT"]):  # compact (QQ)_kl = Q_kj Q_lj
            qq6 = (q[pk] * q[pl]).sum(1)
        out: List[torch.Tensor] = []
        for name in names:
            if name == "s":
                out.append(s)
            elif name == "v.v":
                out.append((v * v).sum(0))
            elif name == "Q:Q":
                out.append((m2 * qc * qc).sum(0))
            elif name == "T:T":
                out.append((m3 * tc * tc).sum(0))
            elif name == "vQv":
                out.append((m2 * qc * vv6).sum(0))
            elif name == "trQ3":
                out.append((m2 * qq6 * qc).sum(0))
            elif name == "QTT":
                out.append((m2 * qc * m6).sum(0))
            elif name == "Tvvv":
                out.append((m3 * tc * (v[self.triple_i] * v[self.triple_j] * v[self.triple_k])).sum(0))
            elif name == "|Qv|2":
                qv = (q * v[None, :]).sum(1)  # (Qv)_i = Q_ij v_j
                out.append((qv * qv).sum(0))
            elif name == "vTTv":
                out.append((m2 * m6 * vv6).sum(0))
            elif name == "QQTT":
                out.append((m2 * qq6 * m6).sum(0))
            elif name == "QTTQ":  # e_k = Q_ij T_ijk; |e|²
                out.append(((m2 * qc).unsqueeze(1) * t6).sum(0).pow(2).sum(0))
            elif name == "TTTT":
                out.append((m2 * m6 * m6).sum(0))
            else:
                raise ValueError("unknown invariant name " + name)
        return torch.stack(out, dim=0)


_ALGEBRA: dict[torch.device, TensorAlgebra] = {}


def _algebra(device: torch.device) -> TensorAlgebra:
    """The shared TensorAlgebra on `device` (built on first use)."""
    if device not in _ALGEBRA:
        _ALGEBRA[device] = TensorAlgebra().to(device)
    return _ALGEBRA[device]


def direction_tensors(rhat: torch.Tensor, l_max: int) -> torch.Tensor:
    """Compact traceless symmetric tensors of unit vectors rhat [P, 3] for l = 0..l_max → [P, C]."""
    return _algebra(rhat.device).direction_tensors(rhat, l_max)


def split_tensors(x: torch.Tensor, l_max: int) -> list[torch.Tensor]:
    """Full tensors, components first, from compact ones x [C, N]: [s [N], v [3,N], Q [3,3,N], T [3,3,3,N]]."""
    return _algebra(x.device).split(x, l_max)


def norm_invariants(x: torch.Tensor, l_max: int, eps: float = 1e-6) -> torch.Tensor:
    """HIP-NN-TS invariants of x [C, N]: s and the regularised norms sqrt(|t_l|² + eps), l = 1..l_max → [l_max+1, N]."""
    return _algebra(x.device).norms(x, l_max, eps)


def hop_invariants(x: torch.Tensor, names: list[str], l_max: int) -> torch.Tensor:
    """HIP-HOP-NN invariants named in `names` of compact tensor sums x [C, N] → [len(names), N] (see TensorAlgebra.hop)."""
    return _algebra(x.device).hop(x, names, l_max)
