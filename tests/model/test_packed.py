"""A packed row trains exactly as its sequences would apart: same summed loss, same gradients."""
from __future__ import annotations

import pytest
import torch

from twinkle.dataset.packing import pack_rows
from twinkle.model import TransformersModel
from twinkle.model.transformers import packed
from twinkle.processor import InputProcessor

from .conftest import MODEL_ID, make_samples

VOCAB = 256


def _config(family: str):
    import transformers as tf
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    if family == 'llama':
        return tf.LlamaConfig(**common)
    if family == 'qwen3_moe':
        return tf.Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 decoder_sparse_step=1, mlp_only_layers=[])
    if family == 'gemma2':  # alternating sliding-window (4 tokens) and full layers, soft-capped logits
        return tf.Gemma2Config(**common, sliding_window=4)
    if family == 'mistral':
        return tf.MistralConfig(**common, sliding_window=4)
    if family == 'qwen3_5':  # Gated DeltaNet (linear attention) layers next to full attention
        return tf.Qwen3_5TextConfig(**common, layer_types=['linear_attention', 'full_attention'],
                                    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                                    linear_num_value_heads=4)
    if family == 'opt':  # learned positions; its mask builder is not given position_ids
        return tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=128, word_embed_proj_dim=64, dropout=0.0)
    if family == 'bloom':  # ALiBi: positions come from the token index
        return tf.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)
    raise AssertionError(family)


def _model(family: str, attn: str) -> TransformersModel:
    torch.manual_seed(0)
    if family == 'tiny-qwen3':
        model = TransformersModel(model_id=MODEL_ID, mixed_precision='no', attn_implementation=attn)
    else:
        model_cls = 'Qwen3_5ForCausalLM' if family == 'qwen3_5' else None
        model = TransformersModel(model_cls=model_cls, config=_config(family), mixed_precision='no',
                                  attn_implementation=attn)
        model.set_processor(InputProcessor(pad_token_id=0))
    model.set_optimizer('SGD', lr=0.1)
    return model


def _loss_sum_and_grads(model: TransformersModel, inputs):
    out = model.forward_backward(inputs=inputs)
    grads = {n: p.grad.clone() for n, p in model.module.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out['loss'] * out['num_items'], out['num_items'], grads


def _assert_same(got, ref):
    loss, items, grads = got
    ref_loss, ref_items, ref_grads = ref
    assert items == ref_items
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    # Some gradients are zero up to rounding (a key bias shifts every score of a row alike): their
    # tolerance is measured against the largest gradient of the model.
    overall = max(float(g.abs().max()) for g in ref_grads.values())
    for name, ref_grad in ref_grads.items():
        scale = max(float(ref_grad.abs().max()), 1e-3 * overall)
        torch.testing.assert_close(grads[name], ref_grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


FAMILIES = ['tiny-qwen3', 'llama', 'qwen3_moe', 'gemma2', 'mistral', 'qwen3_5', 'opt', 'bloom']
# Gemma2 and Bloom have no SDPA attention.
CASES = [(f, a) for f in FAMILIES for a in ('sdpa', 'eager') if (f, a) not in {('gemma2', 'sdpa'), ('bloom', 'sdpa')}]


@pytest.mark.parametrize('family,attn', CASES)
def test_packed_rows_train_as_their_samples_apart(family, attn):
    samples = make_samples(5, seed=3, vocab=VOCAB, min_len=5, max_len=14)
    model = _model(family, attn)
    apart = _loss_sum_and_grads(model, samples)  # one padded batch: one sequence per row

    # Dataset.pack() rows (with their 'lengths'), two rows of unequal length: the shorter one is padded.
    rows = [pack_rows(samples[:3]), pack_rows(samples[3:])]
    _assert_same(_loss_sum_and_grads(model, rows), apart)

    # The padding-free layout of the same samples (one row, cu_seq_lens), with tail padding.
    model.set_processor(InputProcessor(pad_token_id=0, padding_free=True, pad_to_multiple_of=20))
    _assert_same(_loss_sum_and_grads(model, samples), apart)


def test_packed_rows_of_a_moe_model_reporting_router_statistics():
    import transformers as tf
    samples = make_samples(5, seed=3, vocab=VOCAB, min_len=5, max_len=14)
    for attn in ('sdpa', 'eager'):
        config = _config('qwen3_moe')
        config.output_router_logits, config.router_aux_loss_coef = True, 0.5
        torch.manual_seed(0)
        model = TransformersModel(model_cls=tf.Qwen3MoeForCausalLM, config=config, mixed_precision='no',
                                  attn_implementation=attn)
        model.set_processor(InputProcessor(pad_token_id=0))
        model.set_optimizer('SGD', lr=0.1)
        apart = _loss_sum_and_grads(model, samples)
        _assert_same(_loss_sum_and_grads(model, [pack_rows(samples[:3]), pack_rows(samples[3:])]), apart)
        model.set_processor(InputProcessor(pad_token_id=0, padding_free=True, pad_to_multiple_of=20))
        _assert_same(_loss_sum_and_grads(model, samples), apart)


def test_packed_dict_batch_does_not_score_sequence_starts():
    samples = make_samples(4, seed=6, vocab=VOCAB, min_len=5, max_len=14)
    for s in samples:  # labels on every token, the first included
        s['labels'] = list(s['input_ids'])
    model = _model('llama', 'sdpa')
    apart = _loss_sum_and_grads(model, samples)
    row = {'input_ids': [t for s in samples for t in s['input_ids']],
           'labels': [t for s in samples for t in s['labels']],
           'position_ids': [p for s in samples for p in range(len(s['input_ids']))]}
    _assert_same(_loss_sum_and_grads(model, {k: torch.tensor([v]) for k, v in row.items()}), apart)


def test_chunked_cross_entropy_on_packed_rows():
    samples = make_samples(4, seed=5, vocab=VOCAB, min_len=5, max_len=14)
    model = _model('gemma2', 'eager')
    apart = _loss_sum_and_grads(model, samples)
    with model.apply_patch('ChunkedCrossEntropyPatch', chunk_size=7):
        _assert_same(_loss_sum_and_grads(model, [pack_rows(samples[:2]), pack_rows(samples[2:])]), apart)


def _inputs(position_ids, mask=None):
    position_ids = torch.tensor(position_ids)
    out = {'input_ids': torch.arange(position_ids.numel()).view(position_ids.shape), 'position_ids': position_ids}
    if mask is not None:
        out['attention_mask'] = torch.tensor(mask)
    return out


def test_layouts():
    sdpa = _model('llama', 'sdpa').hf_model
    assert packed.plan(sdpa, _inputs([[0, 1, 2, 3]])) is None  # one sequence per row: untouched
    assert packed.plan(sdpa, _inputs([[0, 1, 2, 0]], [[1, 1, 1, 0]])) is None  # padding is not a sequence

    batch = _inputs([[0, 1, 0, 1, 0], [0, 1, 2, 0, 0]], [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    full = packed.plan(sdpa, batch)
    assert full.kind == 'mask'
    assert full.inputs['attention_mask'][0, 0].int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]

    windowed = _model('mistral', 'sdpa').hf_model
    rows = packed.plan(windowed, batch)
    assert rows.kind == 'rows' and 'attention_mask' not in rows.inputs
    assert rows.inputs['position_ids'].tolist() == [[0, 1, 0, 1, 0], [0, 1, 2, 0, 0]]

    # A pad between sequences, followed by a sequence starting at 1, would look like one sequence to
    # transformers' detection: the batch is unpacked instead.
    unpacked = packed.plan(windowed, _inputs([[0, 1, 0, 1, 2]], [[1, 1, 0, 1, 1]]))
    assert unpacked.kind == 'unpack'
    assert unpacked.inputs['position_ids'].tolist() == [[0, 1], [1, 2]]
    values = torch.arange(4.).view(2, 2, 1) + 1
    assert unpacked.restore(values).view(-1).tolist() == [1, 2, 0, 3, 4]

    sdpa.config._attn_implementation = 'flash_attention_2'
    flat = packed.plan(sdpa, _inputs([[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]], [[1] * 5, [1, 1, 1, 0, 0]]))
    assert flat.kind == 'flatten'
    assert flat.inputs['position_ids'].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0]]
    assert flat.inputs['cu_seq_lens_q'].tolist() == [0, 3, 5, 7, 8] and flat.inputs['max_length_q'] == 3

    linear = _model('qwen3_5', 'sdpa').hf_model
    assert packed.plan(linear, _inputs([[0, 1, 0, 1, 2]])).kind == 'unpack'


def test_lengths_of_a_packed_row_are_checked():
    processor = InputProcessor()
    row = pack_rows([{'input_ids': [5, 6, 7], 'labels': [5, 6, 7]}, {'input_ids': [8, 9], 'labels': [8, 9]}])
    del row['position_ids']
    batch = processor([row])
    assert batch['position_ids'].tolist() == [[0, 1, 2, 0, 1]] and 'lengths' not in batch
    with pytest.raises(ValueError, match="'lengths' must be positive ints summing to len"):
        processor([dict(row, lengths=[3, 3])])
    with pytest.raises(ValueError, match="do not restart at 0 where 'lengths'"):
        processor([dict(row, lengths=[2, 3], position_ids=[0, 1, 2, 0, 1])])


@pytest.mark.gpu
def test_packed_rows_with_flash_attention():
    import importlib.util
    if importlib.util.find_spec('flash_attn') is None:
        pytest.skip('flash-attn is not installed')
    samples = make_samples(5, seed=3, vocab=VOCAB, min_len=5, max_len=14)
    torch.manual_seed(0)
    model = TransformersModel(model_id=MODEL_ID, mixed_precision='bf16', attn_implementation='flash_attention_2')
    model.set_optimizer('SGD', lr=0.1)
    apart = model.forward_only(inputs=samples)
    together = model.forward_only(inputs=[pack_rows(samples[:3]), pack_rows(samples[3:])])
    a, b = apart['logps'][apart['mask']], together['logps'][together['mask']]
    # bf16 attention: equal up to its rounding, far below the cross-sequence leak this guards against.
    torch.testing.assert_close(b, a, rtol=0, atol=2e-2)
