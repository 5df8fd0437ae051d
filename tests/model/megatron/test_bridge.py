from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from twinkle.hub import resolve
from twinkle.model.megatron.bridge import (
    ConversionError,
    fuse_qkv,
    hf_to_mcore,
    mcore_to_hf,
    read_hf_folder,
    split_qkv,
    write_hf_folder,
)
from twinkle.model.megatron.config import hf_to_spec
from twinkle.model.megatron.shard import Layout, merge_shards, shard_state

from .tiny import make_checkpoint

ARCHS = ['qwen3', 'llama', 'qwen2', 'qwen3_moe']


@pytest.fixture(scope='module', params=ARCHS)
def checkpoint(request, tmp_path_factory):
    if request.param == 'qwen3':
        folder = resolve('builtin://tiny-qwen3')
    else:
        folder = str(make_checkpoint(request.param, tmp_path_factory.mktemp(request.param)))
    return folder, AutoConfig.from_pretrained(folder)


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_qkv_layout_groups_query_heads_with_their_kv_head():
    heads, groups, d = 4, 2, 3
    q = torch.arange(heads * d).float().unsqueeze(1) + 100
    k = torch.arange(groups * d).float().unsqueeze(1) + 200
    v = torch.arange(groups * d).float().unsqueeze(1) + 300
    fused = fuse_qkv(q, k, v, heads, groups).squeeze(1).tolist()
    # group 0: query heads 0-1, key head 0, value head 0; then group 1.
    assert fused[:12] == [100, 101, 102, 103, 104, 105, 200, 201, 202, 300, 301, 302]
    assert fused[12:18] == [106, 107, 108, 109, 110, 111]
    back = split_qkv(fuse_qkv(q, k, v, heads, groups), heads, groups)
    for x, y in zip(back, (q, k, v)):
        assert torch.equal(x, y)


def test_round_trip_is_exact(checkpoint, tmp_path):
    folder, hf_config = checkpoint
    spec = hf_to_spec(hf_config)
    hf = read_hf_folder(folder)
    mc = hf_to_mcore(hf, spec)
    assert mc['decoder.layers.0.self_attention.linear_qkv.weight'].shape[0] == \
        (spec.transformer['num_attention_heads'] + 2 * spec.transformer['num_query_groups']) * \
        spec.transformer['kv_channels']
    back = mcore_to_hf(mc, spec)
    expected = {k: v for k, v in hf.items() if not (spec.tie_word_embeddings and k == 'lm_head.weight')}
    _assert_same(back, expected)
    # ... and the written folder loads in transformers with the same tensors.
    from transformers import AutoModelForCausalLM
    write_hf_folder(str(tmp_path / 'out'), back, hf_config)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / 'out'), dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.randint(3, hf_config.vocab_size, (2, 7))
    torch.testing.assert_close(loaded(ids).logits, original(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize('layout', [Layout(tp=2), Layout(pp=2), Layout(tp=2, pp=2), Layout(pp=2, ep=2),
                                    Layout(pp=3, first_stage_layers=2, last_stage_layers=1)],
                         ids=['tp2', 'pp2', 'tp2pp2', 'pp2ep2', 'pp3uneven'])
def test_sharded_round_trip(checkpoint, layout):
    folder, hf_config = checkpoint
    spec = hf_to_spec(hf_config, tp_size=layout.tp)
    if layout.ep > 1 and not spec.is_moe:
        layout = Layout(tp=layout.tp, pp=layout.pp)
    full = hf_to_mcore(read_hf_folder(folder), spec)
    shards = {(p, t, e): shard_state(full, spec, layout, p, t, e)
              for p in range(layout.pp) for t in range(layout.tp) for e in range(layout.ep)}
    _assert_same(merge_shards(shards, spec, layout), full)
    # Every shard is a real split: the pieces of one column-parallel tensor differ and halve it.
    if layout.tp == 2:
        a = shards[(0, 0, 0)]['decoder.layers.0.self_attention.linear_qkv.weight']
        b = shards[(0, 1, 0)]['decoder.layers.0.self_attention.linear_qkv.weight']
        assert a.shape[0] * 2 == full['decoder.layers.0.self_attention.linear_qkv.weight'].shape[0]
        assert not torch.equal(a, b)
    if layout.pp > 1:
        last = shards[(layout.pp - 1, 0, 0)]
        assert 'decoder.final_layernorm.weight' in last and 'embedding.word_embeddings.weight' not in last
        assert ('output_layer.weight' in last)
    if layout.ep == 2:
        local = [k for k in shards[(0, 0, 1)] if 'local_experts' in k and k.startswith('decoder.layers.0.')]
        assert {k.split('local_experts.')[1].split('.')[0] for k in local} == {'0', '1'}
        torch.testing.assert_close(
            shards[(0, 0, 1)]['decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight'],
            full['decoder.layers.0.mlp.experts.local_experts.2.linear_fc2.weight'])


def test_fc1_tp_shard_holds_gate_and_up_halves():
    from .tiny import make_config
    spec = hf_to_spec(make_config('llama'), tp_size=2)
    fc1 = torch.arange(2 * 64).float().unsqueeze(1).expand(-1, 32).contiguous()
    full = {'decoder.layers.0.mlp.linear_fc1.weight': fc1}
    rank1 = shard_state(full, spec, Layout(tp=2), tp_rank=1)['decoder.layers.0.mlp.linear_fc1.weight']
    assert rank1[:, 0].tolist() == list(range(32, 64)) + list(range(96, 128))


def test_missing_tensor_is_named(checkpoint):
    folder, hf_config = checkpoint
    hf = read_hf_folder(folder)
    hf.pop('model.layers.1.self_attn.k_proj.weight')
    with pytest.raises(ConversionError, match=r'model\.layers\.1\.self_attn\.k_proj\.weight'):
        hf_to_mcore(hf, hf_to_spec(hf_config))


def test_bad_layouts():
    from .tiny import make_config
    spec = hf_to_spec(make_config('llama'))
    with pytest.raises(ValueError, match='num_key_value_heads'):
        shard_state({}, spec, Layout(tp=4))
    with pytest.raises(ValueError, match='pipeline'):
        Layout(pp=3).layer_ranges(4)
