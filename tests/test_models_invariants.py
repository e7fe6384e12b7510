"""The S2 invariants, computed on compact components, equal their textbook einsum forms on full tensors."""

from __future__ import annotations

import torch

from polyfid.models.invariants import direction_tensors, hop_invariants, invariant_names, split_tensors


def test_hop_invariants_match_einsum_definitions():
    g = torch.Generator().manual_seed(0)
    rhat = torch.nn.functional.normalize(torch.randn(30, 3, generator=g, dtype=torch.float64), dim=1)
    x = direction_tensors(rhat, 3).T @ torch.randn(30, 7, generator=g, dtype=torch.float64)  # [C, N] pair sums
    s, v, q, t = split_tensors(x, 3)
    e = lambda spec, *ops: torch.einsum(spec, *ops)
    m = e("ijkn,ijln->kln", t, t)
    expected = {
        "s": s, "v.v": e("in,in->n", v, v), "Q:Q": e("ijn,ijn->n", q, q), "T:T": e("ijkn,ijkn->n", t, t),
        "vQv": e("in,ijn,jn->n", v, q, v), "trQ3": e("ijn,jkn,kin->n", q, q, q), "QTT": e("kln,kln->n", q, m),
        "Tvvv": e("ijkn,in,jn,kn->n", t, v, v, v), "|Qv|2": e("ijn,jn,ikn,kn->n", q, v, q, v),
        "vTTv": e("kn,kln,ln->n", v, m, v), "QQTT": e("kjn,jln,kln->n", q, q, m),
        "QTTQ": e("ijkn,ijn,abkn,abn->n", t, q, t, q), "TTTT": e("kln,kln->n", m, m),
    }
    names = invariant_names(4, 3)
    assert sorted(names) == sorted(expected)
    got = hop_invariants(x, names, 3)
    for row, name in enumerate(names):
        torch.testing.assert_close(got[row], expected[name], rtol=1e-12, atol=1e-12, msg=name)
