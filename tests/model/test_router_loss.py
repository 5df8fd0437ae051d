"""MoE router load-balancing loss: part of the training loss with the model's coefficient."""
from __future__ import annotations

import pytest
import torch

from twinkle.model import TransformersModel
from twinkle.processor import InputProcessor

from .conftest import make_samples

VOCAB = 256


def _config(family: str, output_router_logits: bool = True):
    import transformers as tf
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                  output_router_logits=output_router_logits, router_aux_loss_coef=0.5)
    if family == 'qwen3_moe':
        return tf.Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 decoder_sparse_step=1, mlp_only_layers=[])
    return tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)


def _model(config) -> TransformersModel:
    torch.manual_seed(0)
    model = TransformersModel(config=config, mixed_precision='no')
    model.set_processor(InputProcessor(pad_token_id=0))
    model.set_optimizer('SGD', lr=0.1)
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.hf_model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('family', ['qwen3_moe', 'mixtral'])
def test_training_loss_is_cross_entropy_plus_weighted_router_loss(family):
    samples = make_samples(3, seed=2, vocab=VOCAB, min_len=6, max_len=16)
    model = _model(_config(family))
    out = model.forward_backward(inputs=samples)
    grads = _grads(model)
    model.zero_grad()

    # The model's own loss (mean cross-entropy + coef * aux_loss) on the same padded batch.
    batch = model.processor(samples)
    ref = model.hf_model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask'],
                         position_ids=batch['position_ids'], labels=batch['labels'], use_cache=False)
    n = out['num_items']
    (ref.loss * n).backward()  # Twinkle's losses are sums over tokens
    ref_grads = _grads(model)
    model.zero_grad()

    assert ref.aux_loss > 0
    assert out['aux_loss'] == pytest.approx(float(ref.aux_loss.detach()), rel=1e-5)
    assert out['loss'] == pytest.approx(float(ref.loss), rel=1e-5)
    assert ref_grads.keys() == grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6 * max(1.0, float(g.abs().max())), msg=name)

    # The router's gradient carries the auxiliary term: without it, the gate gradients differ.
    model.hf_model.config.router_aux_loss_coef = 0.0
    model.forward_backward(inputs=samples)
    ce_only = _grads(model)
    model.zero_grad()
    gates = [name for name in grads if 'gate.weight' in name and 'proj' not in name]
    assert gates
    for name in gates:
        assert grads[name].abs().max() > 0
        assert not torch.allclose(grads[name], ce_only[name], rtol=1e-3, atol=0)


def test_router_loss_is_a_metric_and_counts_in_evaluation():
    samples = make_samples(2, seed=4, vocab=VOCAB, min_len=6, max_len=12)
    model = _model(_config('qwen3_moe'))
    model.forward_backward(inputs=samples)
    model.zero_grad()
    metrics = model.calculate_metric()
    assert metrics['aux_loss'] > 0
    evaluated = model.forward_only(inputs=samples)['loss']
    assert evaluated.metrics['aux_loss'] > 0


def test_no_router_loss_without_output_router_logits():
    samples = make_samples(2, seed=4, vocab=VOCAB, min_len=6, max_len=12)
    model = _model(_config('qwen3_moe', output_router_logits=False))
    out = model.forward_backward(inputs=samples)
    assert 'aux_loss' not in out
