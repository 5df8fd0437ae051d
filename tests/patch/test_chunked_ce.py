from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from twinkle.model import TransformersModel
from twinkle.patch import ChunkedCrossEntropyPatch, Patch
from twinkle.processor import InputProcessor

MODEL_ID = 'builtin://tiny-qwen3'


def _samples(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(8, 24, (1,), generator=g))
        ids = torch.randint(3, 4000, (length,), generator=g).tolist()
        out.append({'input_ids': ids, 'labels': [-100] * 3 + ids[3:]})
    return out


def _model():
    torch.manual_seed(0)
    model = TransformersModel(model_id=MODEL_ID, mixed_precision='no')
    model.add_adapter_to_model('default', LoraConfig(r=4, lora_alpha=8, target_modules='all-linear',
                                                     init_lora_weights='gaussian'))
    model.set_optimizer('SGD', lr=0.1)
    return model


def _loss_and_grads(model, batch):
    out = model.forward_backward(inputs=batch)
    grads = {n: p.grad.clone() for n, p in model.module.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out['loss'], grads


def test_chunked_cross_entropy_keeps_loss_and_gradients():
    batch = _samples()
    model = _model()
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    with model.apply_patch('ChunkedCrossEntropyPatch', chunk_size=7) as patch:
        assert patch.applied and model.forward_core.logits_mode == ('chunked', 7)
        loss, grads = _loss_and_grads(model, batch)
    assert model.forward_core.logits_mode == ('full', None)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        # Chunking changes the float summation order only: differences are rounding-sized.
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5 * scale)


def test_patch_changes_only_its_own_model():
    first, second = _model(), _model()
    patch = first.apply_patch(ChunkedCrossEntropyPatch(chunk_size=16))
    assert first.forward_core.logits_mode[0] == 'chunked'
    assert second.forward_core.logits_mode[0] == 'full'
    patch.revert()
    patch.revert()  # reverting twice is harmless
    assert first.forward_core.logits_mode[0] == 'full'


def test_patch_contract():
    with pytest.raises(ValueError, match='chunk_size'):
        ChunkedCrossEntropyPatch(chunk_size=0)
    model = _model()
    patch = model.apply_patch(ChunkedCrossEntropyPatch())
    with pytest.raises(RuntimeError, match='already applied'):
        patch.apply(model)
    with pytest.raises(Exception, match='ChunkedCrossEntropyPatch'):
        model.apply_patch('ChunkedCrossEntropy')
    assert issubclass(ChunkedCrossEntropyPatch, Patch)


def _random_model(config, model_cls=None):
    torch.manual_seed(0)
    model = TransformersModel(model_cls=model_cls, config=config, mixed_precision='no')
    model.set_processor(InputProcessor(pad_token_id=0))
    model.set_optimizer('SGD', lr=0.1)
    return model


def _small(config_cls, **extra):
    return config_cls(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      **extra)


def _vocab_samples(n=3, vocab=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (int(torch.randint(6, 20, (1,), generator=g)),), generator=g).tolist()
        out.append({'input_ids': ids, 'labels': [-100] + ids[1:]})
    return out


@pytest.mark.parametrize('family', ['gemma2', 'cohere', 'granite'])
def test_chunked_cross_entropy_applies_the_heads_logit_transforms(family):
    from transformers import CohereConfig, Gemma2Config, GraniteConfig
    if family == 'gemma2':
        # A small cap makes the soft-capping change the loss clearly.
        config = _small(Gemma2Config, final_logit_softcapping=2.0, attn_logit_softcapping=50.0)
    elif family == 'cohere':
        config = _small(CohereConfig, logit_scale=0.25)
    else:
        config = _small(GraniteConfig, logits_scaling=4.0)
    model = _random_model(config)
    batch = _vocab_samples()
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    with model.apply_patch('ChunkedCrossEntropyPatch', chunk_size=5):
        loss, grads = _loss_and_grads(model, batch)
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    for name in ref_grads:
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5 * scale)


def test_chunked_cross_entropy_refuses_an_unknown_logit_transform():
    from transformers import LlamaConfig, LlamaForCausalLM

    class ShiftedHead(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    model = _random_model(_small(LlamaConfig), model_cls=ShiftedHead)
    with pytest.raises(NotImplementedError, match='without ChunkedCrossEntropyPatch'):
        model.apply_patch('ChunkedCrossEntropyPatch', chunk_size=5)
    assert model.forward_core.logits_mode == ('full', None)


class _LargestLogits(torch.utils._python_dispatch.TorchDispatchMode):
    """Watches every tensor any op produces (forward and backward) and keeps the most positions seen in
    one tensor whose last dimension is the vocabulary."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.vocab, self.hidden, self.most_rows = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # [H, V] is the (tied) output projection's weight transposed, not logits.
            if isinstance(t, torch.Tensor) and t.ndim >= 2 and t.shape[-1] == self.vocab \
                    and tuple(t.shape) != (self.hidden, self.vocab):
                self.most_rows = max(self.most_rows, t.numel() // self.vocab)
        return out


def test_chunked_cross_entropy_never_builds_the_full_logits():
    """Neither the output projection nor any other op, forward or backward, produces more than one
    chunk of logits at a time; without the patch the same probe sees the full [B, S, V] tensor."""
    batch = _samples(n=16, seed=4)
    model = _model()
    config = model.hf_model.config
    positions = len(batch) * max(len(s['input_ids']) for s in batch)
    assert positions > config.hidden_size  # so that a full logits tensor cannot pass for the [H, V] weight
    head_rows = []
    hook = model.hf_model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_rows.append(out.numel() // out.shape[-1]))
    try:
        probe = _LargestLogits(config.vocab_size, config.hidden_size)
        with probe:
            model.forward_backward(inputs=batch)
        assert probe.most_rows >= positions - len(batch)  # the probe does see full logits
        model.zero_grad()
        chunk = 7
        with model.apply_patch('ChunkedCrossEntropyPatch', chunk_size=chunk):
            head_rows.clear()
            probe = _LargestLogits(config.vocab_size, config.hidden_size)
            with probe:
                out = model.forward_backward(inputs=batch)
        assert out['loss'] > 0
        assert head_rows and max(head_rows) <= chunk
        assert 0 < probe.most_rows <= chunk
    finally:
        hook.remove()
