"""The batched LoRA linear layer on its own: per-token routing, dropout draws, layouts, bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from twinkle.model.multi_lora import AdapterSpec, MultiLoraLinear, Routing, route

IN, OUT = 24, 20


def make_layer(dropout: float = 0.0) -> MultiLoraLinear:
    torch.manual_seed(0)
    layer = MultiLoraLinear(nn.Linear(IN, OUT))
    layer.add_adapter('x', AdapterSpec(r=2, lora_alpha=4, lora_dropout=dropout, seed=11), init_lora_weights=False)
    layer.add_adapter('y', AdapterSpec(r=6, lora_alpha=3, lora_dropout=dropout, use_rslora=True, seed=12),
                      init_lora_weights=False)
    layer.add_adapter('z', AdapterSpec(r=2, lora_alpha=1, seed=13), init_lora_weights=False)
    return layer


def reference(layer: MultiLoraLinear, x: torch.Tensor, name: str, mask: torch.Tensor = None) -> torch.Tensor:
    """One token set through one adapter, written out."""
    spec, a, b = layer.specs[name], layer.lora_A[name], layer.lora_B[name]
    xd = x if mask is None else x * mask
    return layer.base_layer(x) + (xd @ a.T @ b.T) * spec.scaling(a.shape[0])


def test_per_token_routing_of_packed_rows():
    layer = make_layer()
    x = torch.randn(2, 7, IN)
    # Row 0 packs a sequence of 'y' then one of 'x'; row 1 has 'z', a base-only gap, then 'y'.
    ids = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [2, 2, -1, -1, 1, 1, 1]])
    names = ['x', 'y', 'z']
    layer.routing = Routing.per_token(ids, names)
    out = layer(x)
    for b in range(2):
        for t in range(7):
            i = int(ids[b, t])
            want = layer.base_layer(x[b, t]) if i < 0 else reference(layer, x[b, t:t + 1], names[i])[0]
            torch.testing.assert_close(out[b, t], want, rtol=0, atol=1e-6)


def test_grouped_layout_is_a_view_or_permutation_when_groups_are_even():
    routing = Routing(['x', 'x', 'y', 'y'])
    assert routing.plan(4, 3, (2, 6), torch.device('cpu')).dense
    interleaved = Routing(['x', 'y', 'x', 'y']).plan(4, 3, (2, 6), torch.device('cpu'))
    assert not interleaved.dense and not interleaved.padded          # a permutation, no zero rows
    uneven = Routing(['x', 'x', 'y']).plan(3, 3, (2, 6), torch.device('cpu'))
    assert uneven.padded and not uneven.dense
    plan = Routing(['y', 'x', 'z', 'x']).plan(4, 1, (6, 2, 2), torch.device('cpu'))   # y: 6, x: 2, z: 2
    # Groups ordered by rank: equal ranks share one pair of matmuls.
    assert plan.names == ('x', 'z', 'y') and plan.rank_slices == ((2, 0, 2), (6, 2, 3))
    assert plan.counts == (2, 1, 1) and plan.seg_len == 2


def test_layer_without_an_adapter_gives_its_rows_the_base_output():
    layer = make_layer()
    layer.remove_adapter('z')
    x = torch.randn(3, 4, IN)
    layer.routing = Routing(['z', 'x', 'z'])
    out = layer(x)
    torch.testing.assert_close(out[[0, 2]], layer.base_layer(x[[0, 2]]), rtol=0, atol=0)
    torch.testing.assert_close(out[1], reference(layer, x[1], 'x'), rtol=0, atol=1e-6)


def test_dropout_masks_come_from_the_adapters_generator():
    p = 0.25
    layer = make_layer(dropout=p).train()
    x = torch.randn(4, 5, IN)
    layer.routing = Routing(['y', 'x', 'y', 'z'])
    out = layer(x)
    for name, rows, seed in (('x', [1], 11), ('y', [0, 2], 12)):
        gen = torch.Generator().manual_seed(seed)
        keep = torch.empty(len(rows) * 5, IN).bernoulli_(1 - p, generator=gen) / (1 - p)
        want = reference(layer, x[rows].reshape(-1, IN), name, keep).view(len(rows), 5, OUT)
        torch.testing.assert_close(out[rows], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[3], reference(layer, x[3], 'z'), rtol=0, atol=1e-6)   # z has no dropout
    layer.eval()
    torch.testing.assert_close(layer(x)[1], reference(layer, x[1], 'x'), rtol=0, atol=1e-6)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match='adapter name'):
        make_layer().add_adapter('a.b', AdapterSpec(r=2, lora_alpha=2))
    with pytest.raises(ValueError, match='r must be a positive int'):
        AdapterSpec(r=0, lora_alpha=2)
    with pytest.raises(ValueError, match='lora_dropout'):
        AdapterSpec(r=2, lora_alpha=2, lora_dropout=1.0)
    with pytest.raises(ValueError, match=r'token_adapter_ids must lie in \[-1, 1\]'):
        Routing.per_token(torch.tensor([[0, 2]]), ['x', 'y'])
    layer = make_layer()
    layer.routing = Routing.per_token(torch.zeros(2, 3, dtype=torch.long), ['x'])
    with pytest.raises(ValueError, match='token_adapter_ids has shape'):
        layer(torch.randn(2, 4, IN))
    with pytest.raises(ValueError, match='lora_A must be'):
        layer.set_adapter_weights('x', torch.zeros(2, IN + 1), torch.zeros(OUT, 2))
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match='unknown adapter'):
        with route(model, ['w']):
            pass


@pytest.mark.parametrize('autocast', [False, True], ids=['fp32', 'bf16-autocast'])
def test_grouped_products_give_autograds_values_and_gradients_also_under_autocast(autocast):
    """The grouped products' own backward gives what autograd's backward of the same batched products gives (to
    the rounding of the products' precision: one gradient product runs in the other orientation), in fp32 and
    under bf16 autocast, where the products run in bf16 and each gradient keeps its input's dtype."""
    from twinkle.model.multi_lora.layer import _GroupedLora
    torch.manual_seed(0)
    groups, seg, rank = 3, 5, 4
    x = torch.randn(groups, seg, IN, requires_grad=True)
    weights_a = [torch.randn(rank, IN, requires_grad=True) for _ in range(groups)]
    weights_b = [torch.randn(OUT, rank, requires_grad=True) for _ in range(groups)]
    scale = torch.tensor([0.5, 2.0, 1.0]).view(-1, 1, 1)
    grad_out = torch.randn(groups, seg, OUT)
    leaves = [x] + weights_a + weights_b

    def autograds() -> torch.Tensor:
        h = torch.bmm(x, torch.stack(weights_a).transpose(1, 2))
        return torch.bmm(h, torch.stack(weights_b).transpose(1, 2)) * scale

    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        ours = _GroupedLora.apply(x, scale, *weights_a, *weights_b)
        theirs = autograds()
    assert torch.equal(ours, theirs)
    precision = 1e-2 if autocast else 1e-5
    mine_all = torch.autograd.grad(ours, leaves, grad_out)
    for mine, want, leaf in zip(mine_all, torch.autograd.grad(theirs, leaves, grad_out), leaves):
        assert mine.dtype == leaf.dtype
        torch.testing.assert_close(mine, want, rtol=0, atol=precision * float(want.abs().max()))
    # A weight that needs no gradient (a forward-only adapter) gets none; the others get the same as before.
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        again = _GroupedLora.apply(x, scale, weights_a[0].detach(), *weights_a[1:], *weights_b)
    rest = [x] + weights_a[1:] + weights_b
    for mine, before in zip(torch.autograd.grad(again, rest, grad_out), mine_all[:1] + mine_all[2:]):
        assert torch.equal(mine, before)
