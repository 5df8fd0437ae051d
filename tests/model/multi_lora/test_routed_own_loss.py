"""A routed part with its adapter's own loss leaves the adapter as ``forward_backward`` does.

Two models built alike train two adapters (default cross-entropy; GRPO with loss keywords and an extra
metric): one with ``forward_backward`` per adapter, the other with one routed batch. Results, gradients,
window and metric state must agree.
"""
from __future__ import annotations

import pytest
import torch

from twinkle.model.transformers.routed import RoutedPart, RoutedResult

from . import helpers

NAMES = ('ce', 'grpo')


def build():
    m = helpers.routed_model(NAMES, (4, 8))
    m.set_loss('GRPOLoss', adapter_name='grpo')
    m.add_metric('GRPOMetric', adapter_name='grpo')
    return m


def batch(seed: int, rows: int, width: int, policy: bool):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 4000, (rows, width), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    out = {'input_ids': ids, 'labels': labels, 'attention_mask': torch.ones_like(ids)}
    out['attention_mask'][0, -2:] = 0   # a padded row
    out['labels'][0, -2:] = -100
    if policy:
        out['advantages'] = torch.randn(rows, generator=g)
        out['old_logps'] = -torch.rand(rows, width, generator=g) * 3
    return out


def grads(model, name):
    return {n: p.grad.clone() for n, p in model.module.named_parameters() if f'.{name}.' in n and p.grad is not None}


@pytest.fixture(scope='module')
def models():
    return build(), build()


def metrics(model, name):
    out = model.calculate_metric(adapter_name=name)
    out.pop('tokens_per_s', None)   # a rate over wall time
    return out


def test_routed_parts_with_their_own_loss_match_forward_backward(models):
    alone, routed = models
    inputs = {'ce': batch(1, 2, 9, False), 'grpo': batch(2, 3, 14, True)}
    kwargs = {'ce': {}, 'grpo': {}}
    expected = {n: alone.forward_backward(inputs=inputs[n], adapter_name=n, loss_kwargs=kwargs[n]) for n in NAMES}
    results = routed.forward_backward_routed([RoutedPart(n, inputs[n], None, True, kwargs[n]) for n in NAMES])
    for name, result in zip(NAMES, results):
        assert isinstance(result, RoutedResult), result
        want = expected[name]
        assert result.summary is not None and result.summary.keys() == want.keys()
        for key, value in want.items():
            assert result.summary[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)
        own, got = grads(alone, name), grads(routed, name)
        assert own and own.keys() == got.keys()
        for key in own:   # the same sums in other matmul shapes: equal to fp32 rounding
            tol = 1e-5 * max(1.0, float(own[key].abs().max()))
            torch.testing.assert_close(got[key], own[key], rtol=0, atol=tol)
        sa, sr = alone._session(name), routed._session(name)
        assert (sa.window_micro_steps, sa.micro_step, sa.window_reduction, sa.tokens_since_report) == \
               (sr.window_micro_steps, sr.micro_step, sr.window_reduction, sr.tokens_since_report)
        assert float(sa.window_items) == float(sr.window_items)
        ma, mr = metrics(alone, name), metrics(routed, name)
        assert ma.keys() == mr.keys() and len(ma) > 2
        for key in ma:
            assert mr[key] == pytest.approx(ma[key], rel=1e-5, abs=1e-6), (name, key)


def test_a_part_whose_loss_fails_fails_alone_and_adds_nothing(models):
    _, routed = models
    for name in NAMES:
        routed.zero_grad(adapter_name=name)
    no_policy_inputs = batch(3, 2, 7, False)   # GRPO needs old_logps and advantages
    results = routed.forward_backward_routed([RoutedPart('ce', batch(4, 1, 6, False)),
                                              RoutedPart('grpo', no_policy_inputs)])
    assert isinstance(results[0], RoutedResult) and results[0].summary is not None
    assert isinstance(results[1], ValueError) and 'needs inputs' in str(results[1])
    assert routed._session('grpo').window_micro_steps == 0
    assert all(not g.any() for g in grads(routed, 'grpo').values())
    assert routed._session('ce').window_micro_steps == 1
