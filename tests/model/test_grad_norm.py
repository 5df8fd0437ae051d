"""The gradient norm: float64-accurate over mixed sizes, dtypes and layouts; clipping to max_norm."""
from __future__ import annotations

import pytest
import torch

from twinkle.model.transformers.strategy import clip_grad_norm_fp64, local_norm_fp64


def _exact(grads, p):
    norms = torch.stack([torch.linalg.vector_norm(g.double(), p) for g in grads])
    return norms.max() if p == float('inf') else norms.pow(p).sum()


@pytest.mark.parametrize('p', [2.0, 1.0, float('inf')])
def test_norm_matches_float64_over_mixed_sizes_and_dtypes(p):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(700, 300, generator=g) * 1e-3, torch.randn(7, generator=g), torch.randn(40000, generator=g),
             torch.randn(3000, generator=g).bfloat16(), torch.randn(5, 5, generator=g).t()]  # one non-contiguous
    got = local_norm_fp64(grads, p)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _exact(grads, p), rtol=1e-12, atol=0)


def test_clip_scales_to_max_norm():
    params = [torch.nn.Parameter(torch.zeros(100, 100)) for _ in range(2)]
    for i, q in enumerate(params):
        q.grad = torch.full_like(q, float(i + 1))
    total = clip_grad_norm_fp64(params, max_norm=1.0, norm_type=2.0)
    assert float(total) == pytest.approx(((100 * 100) * (1 + 4)) ** 0.5, rel=1e-12)
    after = torch.sqrt(sum((q.grad.double() ** 2).sum() for q in params))
    assert float(after) == pytest.approx(1.0, rel=1e-5)
    assert local_norm_fp64([], 2.0).item() == 0.0


@pytest.mark.parametrize('max_norm', [1e9, 0.5])
@pytest.mark.parametrize('p', [2.0, float('inf')])
def test_scale_folded_into_the_clip_equals_scaling_first(max_norm, p):
    """``scale=`` multiplies and clips in one pass: the result of multiplying first, then clipping."""
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(300, 70, generator=g), torch.randn(513, generator=g)]
    folded = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
    twice = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
    for a, b, t in zip(folded, twice, grads):
        a.grad, b.grad = t.clone(), t.clone() * 0.01
    got = clip_grad_norm_fp64(folded, max_norm, p, scale=0.01)
    want = clip_grad_norm_fp64(twice, max_norm, p)
    assert float(got) == pytest.approx(float(want), rel=1e-7)
    for a, b in zip(folded, twice):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
