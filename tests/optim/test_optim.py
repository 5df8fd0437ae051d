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



@pytest.mark.parametrize('name', ['AdamW', 'Adam', 'SGD', 'RMSprop'])
def test_cpu_optimizers_step_with_foreach_kernels_and_the_same_numbers(name):
    torch.manual_seed(0)
    ours, reference = Tiny(), Tiny()
    reference.load_state_dict(ours.state_dict())
    kwargs = {'lr': 0.01, 'momentum': 0.9} if name in ('SGD', 'RMSprop') else {'lr': 0.01}
    opt = build_optimizer(name, ours.named_parameters(), **kwargs)
    assert all(g['foreach'] is True for g in opt.param_groups)
    per_tensor = build_optimizer(name, reference.named_parameters(), foreach=False, **kwargs)
    assert all(g['foreach'] is False for g in per_tensor.param_groups)  # the caller's choice is kept
    for step in range(4):
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(step))
        for model, o in ((ours, opt), (reference, per_tensor)):
            model.norm(model.proj(x)).pow(2).sum().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(ours.parameters(), reference.parameters()):
        assert torch.equal(a, b)



def test_a_loaded_state_keeps_the_loading_optimizers_kernel_choice():
    saved = build_optimizer('AdamW', Tiny().named_parameters(), lr=0.01, foreach=False)
    loading = build_optimizer('AdamW', Tiny().named_parameters(), lr=0.02)
    loading.load_state_dict(saved.state_dict())
    assert [g['foreach'] for g in loading.param_groups] == [True, True]
    assert [g['lr'] for g in loading.param_groups] == [0.01, 0.01]  # the numbers do come from the state


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
