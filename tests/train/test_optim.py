"""Optimiser groups and the warm-up + cosine schedule."""

import math

import pytest
import torch
from torch import nn

from patfast.train.optim import WarmupCosine, make_optimizer, param_groups


def test_no_weight_decay_on_1d_and_scalar_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    beta = nn.Parameter(torch.zeros(()))
    params = list(model.parameters()) + [beta]
    decay, no_decay = param_groups(params, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert any(p is beta for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(params)


@pytest.mark.parametrize("opt, cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_make_optimizer(opt, cls):
    o = make_optimizer([nn.Parameter(torch.ones(2, 2))], opt, 0.1, 0.01)
    assert isinstance(o, cls)


def test_warmup_then_cosine():
    opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1.0)
    s = WarmupCosine(opt, lr=0.4, min_lr=0.004, warmup=4, total=104)
    assert [s.value(i) for i in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert s.value(4) == pytest.approx(0.4)  # the cosine starts at the peak
    assert s.value(54) == pytest.approx(0.004 + 0.5 * 0.396 * (1 + math.cos(math.pi * 0.5)))
    assert s.value(104) == pytest.approx(0.004) and s.value(500) == pytest.approx(0.004)
    s.step(2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.3)
