"""The EMA of the weights: its arithmetic, the swap in and out, and its state through a checkpoint."""

from __future__ import annotations

import pytest
import torch

from polyfid.distributed.config import ConfigError, RunConfig
from polyfid.distributed.loop.ema import EMA


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    net[1].bias.requires_grad_(False)  # frozen parameters are not averaged
    return net


def test_ema_follows_the_weights_with_a_ramped_decay():
    net = _net()
    ema = EMA(net, decay=0.9)
    start = net[0].weight.detach().clone()
    expect = start.clone()
    for n in range(1, 6):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        ema.update(net)
        d = min(0.9, (1 + n) / (10 + n))
        expect = d * expect + (1 - d) * net[0].weight.detach()
    assert torch.allclose(ema.shadow[ema.names.index("0.weight")], expect, atol=1e-6)
    assert "1.bias" not in ema.names


def test_applied_swaps_the_average_in_and_back_out():
    net = _net()
    ema = EMA(net, decay=0.5)
    with torch.no_grad():
        net[0].weight.add_(2.0)
    live = net[0].weight.detach().clone()
    with ema.applied(net) as m:
        assert m is net and torch.equal(net[0].weight, ema.shadow[ema.names.index("0.weight")])
    assert torch.equal(net[0].weight, live)


def test_state_round_trip_and_mismatch():
    net = _net()
    ema = EMA(net, 0.99)
    ema.update(net)
    again = EMA(_net(), 0.99)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 1 and all(torch.equal(a, b) for a, b in zip(again.shadow, ema.shadow))
    with pytest.raises(ValueError, match="other parameters"):
        EMA(torch.nn.Linear(2, 2), 0.9).load_state_dict(ema.state_dict())


def test_decay_is_checked():
    with pytest.raises(ConfigError, match="ema_decay"):
        RunConfig.from_dict({"trainer": {"ema_decay": 1.0}})
