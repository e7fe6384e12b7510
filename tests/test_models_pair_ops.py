"""The fused pair operations equal their plain-torch forms, with first and second derivatives."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from polyfid.models import pair_ops
from polyfid.models.pair_ops import gather_contract, gather_project, scatter_outer

pytestmark = pytest.mark.usefixtures("one_thread")
P, A, N, O = 13, 5, 3, 4


@pytest.fixture(params=[1 << 20, 7], ids=["one-chunk", "many-chunks"])
def chunk(request, monkeypatch):
    monkeypatch.setenv("POLYFID_PAIR_CHUNK", str(request.param))  # 7 elements: one pair per chunk


def _inputs():
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)
    return torch.randint(0, A, (P,), generator=g), make(P, N), make(A, N, O), make(P, O)


def test_values_match_plain_torch(chunk):
    idx, s, y, g = _inputs()
    torch.testing.assert_close(gather_contract(s, y, idx), (s.unsqueeze(2) * y[idx]).sum(1))
    torch.testing.assert_close(gather_project(g, y, idx), (g.unsqueeze(1) * y[idx]).sum(2))
    plain = torch.zeros(A, N, O, dtype=torch.float64).index_add(0, idx, s.unsqueeze(2) * g.unsqueeze(1))
    torch.testing.assert_close(scatter_outer(s, g, idx, A), plain)


def test_first_and_second_derivatives(chunk):
    idx, s, y, g = _inputs()
    cases = [(lambda s, y: gather_contract(s, y, idx), (s, y)), (lambda g, y: gather_project(g, y, idx), (g, y)),
             (lambda s, g: scatter_outer(s, g, idx, A), (s, g))]
    for fn, args in cases:
        assert gradcheck(fn, args)
        assert gradgradcheck(fn, args)
