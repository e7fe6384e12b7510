"""Cartesian direction tensors of each pair and the rotation invariants built from their sums (S2).

A rank-l tensor is traceless and symmetric, so a pair stores only its unique components ("compact"):
1, 3, 6 and 10 numbers for l = 0..3. After the environment sum they are expanded to full 3^l arrays.
"""

from __future__ import annotations

import itertools

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


_EXPAND = {l: _expand_index(l) for l in range(2, 4)}


def direction_tensors(rhat: torch.Tensor, l_max: int) -> torch.Tensor:
    """Compact traceless symmetric tensors of unit vectors rhat [P, 3] for l = 0..l_max → [P, C]."""
    parts = [torch.ones_like(rhat[:, :1])]
    if l_max >= 1:
        parts.append(rhat)
    if l_max >= 2:
        i, j = (torch.tensor(c, device=rhat.device) for c in zip(*_UNIQUE[2]))
        delta = (i == j).to(rhat.dtype)
        parts.append(rhat[:, i] * rhat[:, j] - delta / 3.0)
    if l_max >= 3:
        i, j, k = (torch.tensor(c, device=rhat.device) for c in zip(*_UNIQUE[3]))
        d_ij, d_ik, d_jk = ((a == b).to(rhat.dtype) for a, b in ((i, j), (i, k), (j, k)))
        ri, rj, rk = rhat[:, i], rhat[:, j], rhat[:, k]
        parts.append(ri * rj * rk - (d_ij * rk + d_ik * rj + d_jk * ri) / 5.0)
    return torch.cat(parts, dim=1)


def split_tensors(x: torch.Tensor, l_max: int) -> list[torch.Tensor]:
    """Full tensors, components first, from compact ones x [C, N]: [s [N], v [3,N], Q [3,3,N], T [3,3,3,N]]."""
    out = []
    for l in range(l_max + 1):
        part = x[_OFFSETS[l] : _OFFSETS[l] + N_COMPONENTS[l]]
        if l == 0:
            out.append(part[0])
        elif l == 1:
            out.append(part)
        else:
            full = part.index_select(0, _EXPAND[l].to(x.device))
            out.append(full.reshape(*([3] * l), x.shape[1]))
    return out


def norm_invariants(x: torch.Tensor, l_max: int, eps: float = 1e-6) -> torch.Tensor:
    """HIP-NN-TS invariants of x [C, N]: s and the regularised norms sqrt(|t_l|² + eps), l = 1..l_max → [l_max+1, N]."""
    tensors = split_tensors(x, l_max)
    norms = [tensors[0]]
    for l, t in enumerate(tensors[1:], start=1):
        norms.append(torch.sqrt((t * t).sum(dim=tuple(range(l))) + eps))
    return torch.stack(norms, dim=0)


def _multiplicity(l: int) -> torch.Tensor:
    """How many full index tuples each compact component of a rank-l symmetric tensor stands for."""
    return torch.tensor([float(len(set(itertools.permutations(key)))) for key in _UNIQUE[l]])


_MULT = {l: _multiplicity(l) for l in range(4)}
_PAIR_K, _PAIR_L = (torch.tensor(c) for c in zip(*_UNIQUE[2]))  # (k, l) with k <= l, in compact order
_TRIPLE = [torch.tensor(c) for c in zip(*_UNIQUE[3])]
_ROWS_IJ = torch.tensor([3 * i + j for i, j in _UNIQUE[2]])  # rows (i <= j) of T reshaped to [(ij), k]


def hop_invariants(x: torch.Tensor, names: list[str], l_max: int) -> torch.Tensor:
    """HIP-HOP-NN invariants named in `names` of compact tensor sums x [C, N] → [len(names), N].

    Components come first and the N = atoms × features axis last, so every contraction is a broadcast
    multiply and a sum over long contiguous rows (fast on CPU and GPU, unlike batches of 3×3 matrix
    products). A full contraction of two symmetric tensors is a sum over their compact components
    weighted by multiplicities (Q:Q has 6 terms, not 9; M_kl = T_ijk T_ijl sums 6 (ij), not 9), which
    roughly halves the work of the rank-3 invariants.
    """
    dev, dt = x.device, x.dtype
    mult = {l: m.to(device=dev, dtype=dt).unsqueeze(1) for l, m in _MULT.items()}
    t = split_tensors(x, l_max)
    s, v, q = (t + [None] * 3)[:3]
    qc = x[4:10] if l_max >= 2 else None  # compact Q [6, N]
    tc = x[10:20] if l_max >= 3 else None  # compact T [10, N]
    pk, pl = _PAIR_K.to(dev), _PAIR_L.to(dev)
    cache: dict[str, torch.Tensor] = {}

    def get(key: str, make) -> torch.Tensor:
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def sym_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """A:B of two symmetric 3×3 tensors given by their 6 compact components."""
        return (mult[2] * a * b).sum(0)

    # T_(ij)k over the 6 rows i <= j, weighted by the multiplicity of (ij): [6, 3, N]
    t6 = lambda: get("t6", lambda: t[3].reshape(9, 3, -1).index_select(0, _ROWS_IJ.to(dev)))
    wt6 = lambda: get("wt6", lambda: mult[2].unsqueeze(1) * t6())
    m6 = lambda: get("M", lambda: (wt6()[:, pk] * t6()[:, pl]).sum(0))  # compact M_kl = T_ijk T_ijl
    vv6 = lambda: get("vv", lambda: v[pk] * v[pl])  # compact v_k v_l
    qv = lambda: get("Qv", lambda: (q * v[None, :]).sum(1))  # (Qv)_i = Q_ij v_j
    qq6 = lambda: get("QQ", lambda: (q[pk] * q[pl]).sum(1))  # compact (QQ)_kl = Q_kj Q_lj
    formulas = {
        "s": lambda: s,
        "v.v": lambda: (v * v).sum(0),
        "Q:Q": lambda: sym_dot(qc, qc),
        "T:T": lambda: (mult[3] * tc * tc).sum(0),
        "vQv": lambda: sym_dot(qc, vv6()),
        "trQ3": lambda: sym_dot(qq6(), qc),
        "QTT": lambda: sym_dot(qc, m6()),
        "Tvvv": lambda: (mult[3] * tc * (v[_TRIPLE[0]] * v[_TRIPLE[1]] * v[_TRIPLE[2]])).sum(0),
        "|Qv|2": lambda: (qv() * qv()).sum(0),
        "vTTv": lambda: sym_dot(m6(), vv6()),
        "QQTT": lambda: sym_dot(qq6(), m6()),
        "QTTQ": lambda: ((mult[2] * qc).unsqueeze(1) * t6()).sum(0).pow(2).sum(0),  # e_k = Q_ij T_ijk; |e|²
        "TTTT": lambda: sym_dot(m6(), m6()),
    }
    return torch.stack([formulas[name]() for name in names], dim=0)
