from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from twinkle.optim import build_optimizer, build_scheduler


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


def test_weight_decay_skips_biases_and_norms():
    m = Tiny()
    opt = build_optimizer('AdamW', m.named_parameters(), lr=1e-3, weight_decay=0.1)
    decayed = [p for g in opt.param_groups if g['weight_decay'] > 0 for p in g['params']]
    assert decayed == [m.proj.weight]
    assert sum(len(g['params']) for g in opt.param_groups) == 4


@pytest.mark.parametrize('name', ['AdamW', 'SGD', 'Adam', 'RMSprop'])
def test_any_torch_optimizer_by_name(name):
    opt = build_optimizer(name, Tiny().named_parameters(), lr=0.01)
    assert type(opt).__name__ == name


def test_optimizer_class_and_unknown_name():
    assert isinstance(build_optimizer(torch.optim.SGD, Tiny().named_parameters(), lr=0.1), torch.optim.SGD)
    with pytest.raises(ValueError, match="Did you mean 'AdamW'"):
        build_optimizer('AdamWW', Tiny().named_parameters(), lr=0.1)


def _lrs(name, steps=10, **kw):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(name, opt, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    return out


def test_cosine_warmup_shape():
    lrs = _lrs('CosineWarmupScheduler', num_warmup_steps=2, num_training_steps=10)
    assert lrs[0] == pytest.approx(1 / 3) and lrs[1] == pytest.approx(2 / 3)
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_linear_and_constant_warmup():
    lin = _lrs('LinearWarmupScheduler', num_warmup_steps=0, num_training_steps=4, steps=4)
    assert lin == pytest.approx([1.0, 0.75, 0.5, 0.25])
    const = _lrs('ConstantWarmupScheduler', num_warmup_steps=1, num_training_steps=4, steps=4)
    assert const == pytest.approx([0.5, 1.0, 1.0, 1.0])


def test_torch_scheduler_by_name_and_errors():
    assert _lrs('StepLR', steps=3, step_size=2, gamma=0.5) == pytest.approx([1.0, 1.0, 0.5])
    with pytest.raises(ValueError, match='CosineWarmupScheduler'):
        _lrs('CosineWarmup', num_warmup_steps=1, num_training_steps=2)
    with pytest.raises(ValueError, match='num_training_steps'):
        _lrs('CosineWarmupScheduler', num_warmup_steps=1, num_training_steps=0)
