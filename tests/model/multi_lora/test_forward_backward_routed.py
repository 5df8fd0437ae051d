"""TransformersModel.forward_backward_routed: each part gets exactly what its own forward + backward gives."""
from __future__ import annotations

import pytest
import torch

from twinkle.loss.base import LossOutput
from twinkle.model.transformers.routed import RoutedPart, RoutedResult

from . import helpers

NAMES = ('first', 'second')


def logp_loss(inputs, outputs):
    mask = (inputs['labels'] != -100).to(outputs['logps'].dtype)
    return LossOutput(loss=-(outputs['logps'] * mask).sum(), num_items=mask.sum(), reduction='sum')


def bad_loss(inputs, outputs):
    raise ValueError('this loss fails')


@pytest.fixture(scope='module')
def model():
    m = helpers.routed_model(NAMES, (4, 8))
    return m


def batch(seed: int, rows: int, width: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 4000, (rows, width), generator=g)
    return {'input_ids': ids, 'labels': ids.clone(), 'attention_mask': torch.ones_like(ids)}


def grads(model, name):
    return {n: p.grad.clone() for n, p in model.module.named_parameters() if f'.{name}.' in n and p.grad is not None}


def test_routed_parts_match_their_own_forward_backward_and_a_failing_part_fails_alone(model):
    inputs = {NAMES[0]: batch(1, 2, 9), NAMES[1]: batch(2, 1, 14)}
    alone = {}
    for name in NAMES:
        model.zero_grad(adapter_name=name)
        out = model.forward(inputs=inputs[name], adapter_name=name)
        loss = logp_loss(out['inputs'], out)
        model.backward(loss, adapter_name=name)
        alone[name] = (float(loss.loss), out['logps'].detach(), grads(model, name))
        model.zero_grad(adapter_name=name)
    results = model.forward_backward_routed([RoutedPart(n, inputs[n], logp_loss) for n in NAMES]
                                            + [RoutedPart(NAMES[0], batch(3, 1, 5), bad_loss)])
    assert isinstance(results[2], ValueError)
    for name, result in zip(NAMES, results):
        assert isinstance(result, RoutedResult)
        loss, logps, own = alone[name]
        assert abs(float(result.loss.loss) - loss) <= 1e-5 * max(1.0, abs(loss))
        torch.testing.assert_close(result.logps, logps, rtol=0, atol=1e-5)
        routed = grads(model, name)
        assert routed.keys() == own.keys() and own
        for key in own:   # the same sums in other matmul shapes: equal to fp32 rounding
            tol = 1e-5 * max(1.0, float(own[key].abs().max()))
            torch.testing.assert_close(routed[key], own[key], rtol=0, atol=tol)
        assert model._session(name).window_micro_steps == 1   # the failed part added nothing to the window
    assert model.routable(NAMES[0])


def test_routed_parts_under_bf16_autocast_match_their_own_forward_backward_to_bf16_rounding():
    """With mixed_precision='bf16' (autocast) the shared forward's LoRA products run in bf16, and so does their
    backward; each part still gets what its own forward + backward gives, to bf16 rounding."""
    model = helpers.routed_model(NAMES, (4, 8), mixed_precision='bf16')
    inputs = {NAMES[0]: batch(4, 2, 9), NAMES[1]: batch(5, 1, 14)}
    alone = {}
    for name in NAMES:
        out = model.forward(inputs=inputs[name], adapter_name=name)
        loss = logp_loss(out['inputs'], out)
        model.backward(loss, adapter_name=name)
        alone[name] = (float(loss.loss), grads(model, name))
        model.zero_grad(adapter_name=name)
    results = model.forward_backward_routed([RoutedPart(n, inputs[n], logp_loss) for n in NAMES])
    for name, result in zip(NAMES, results):
        assert isinstance(result, RoutedResult), result
        loss, own = alone[name]
        assert abs(float(result.loss.loss) - loss) <= 2e-2 * abs(loss)
        routed = grads(model, name)
        assert routed.keys() == own.keys() and own
        for key in own:
            assert routed[key].dtype == own[key].dtype == torch.float32
            torch.testing.assert_close(routed[key], own[key], rtol=0, atol=5e-2 * float(own[key].abs().max()))
