"""Model families as registered units, and loading only the checkpoint tensors a rank needs (CPU only)."""
from __future__ import annotations

import pytest
import torch

from twinkle.model.megatron import families
from twinkle.model.megatron.bridge import hf_folder_keys, hf_to_mcore, mcore_to_hf, read_hf_folder
from twinkle.model.megatron.builder import read_rank_part
from twinkle.model.megatron.config import SUPPORTED_MODEL_TYPES, hf_to_spec
from twinkle.model.megatron.families import ModelFamily, family_of, register_family
from twinkle.model.megatron.shard import Layout, rank_hf_keys, shard_state

from .tiny import make_checkpoint, make_config


@pytest.fixture(scope='module')
def moe_checkpoint(tmp_path_factory):
    return str(make_checkpoint('qwen3_moe', tmp_path_factory.mktemp('moe')))


def test_every_supported_type_is_a_registered_family_with_its_sharding_rules():
    assert set(SUPPORTED_MODEL_TYPES) == {'llama', 'qwen2', 'qwen3', 'qwen3_moe'}
    for model_type in SUPPORTED_MODEL_TYPES:
        family = family_of(model_type)
        assert family.tp_kind('self_attention.linear_qkv.weight') == 'column'
        assert family.tp_kind('self_attention.linear_qkv.bias') == 'column'
        assert family.tp_kind('mlp.linear_fc1.weight') == 'fc1'
        assert family.tp_kind('mlp.experts.local_experts.3.linear_fc2.weight') == 'row'
        assert family.tp_kind('self_attention.linear_proj.weight') == 'row'
        assert family.tp_kind('input_layernorm.weight') is None
        assert family.linear('linear_qkv').hf_parts == ('q_proj', 'k_proj', 'v_proj')
    assert family_of('qwen3').qk_layernorm and not family_of('llama').qk_layernorm
    assert family_of('qwen3_moe').is_moe and 'mlp.gate.weight' in family_of('qwen3_moe').renames
    with pytest.raises(NotImplementedError, match="'gpt2'.*register_family"):
        family_of('gpt2')


def test_a_new_family_is_one_registration(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, MistralConfig
    hf_config = MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                              sliding_window=None, tie_word_embeddings=False)
    with pytest.raises(NotImplementedError, match='mistral'):
        hf_to_spec(hf_config)
    llama = family_of('llama')
    monkeypatch.setitem(families._FAMILIES, 'mistral', ModelFamily('mistral', llama.renames))
    spec = hf_to_spec(hf_config)
    assert spec.model_type == 'mistral' and not spec.transformer['add_qkv_bias']
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf_config).save_pretrained(str(tmp_path))
    hf = read_hf_folder(str(tmp_path))
    back = mcore_to_hf(hf_to_mcore(hf, spec), spec)
    assert sorted(back) == sorted(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    assert register_family is families.register_family


@pytest.mark.parametrize('layout', [Layout(pp=2, ep=2), Layout(tp=2, pp=2), Layout(pp=3, first_stage_layers=2,
                                                                                   last_stage_layers=1)],
                         ids=['pp2ep2', 'tp2pp2', 'pp3uneven'])
def test_each_rank_reads_only_its_tensors_and_gets_the_same_shard(moe_checkpoint, layout):
    spec = hf_to_spec(make_config('qwen3_moe'), tp_size=layout.tp)
    all_keys = hf_folder_keys(moe_checkpoint)
    full = hf_to_mcore(read_hf_folder(moe_checkpoint), spec)
    read = set()
    for p, (start, end) in enumerate(layout.layer_ranges(spec.num_layers)):
        for e in range(layout.ep):
            keys, _, _ = rank_hf_keys(all_keys, spec, layout, p, e)
            read |= set(keys)
            assert len(keys) < len(all_keys)
            layers = {int(k.split('.')[2]) for k in keys if k.startswith('model.layers.')}
            assert layers == set(range(start, end))
            experts = {int(k.split('experts.')[1].split('.')[0]) for k in keys if '.experts.' in k}
            assert experts == {x for x in range(spec.num_experts) if x // (spec.num_experts // layout.ep) == e}
            assert ('model.embed_tokens.weight' in keys) == (p == 0)
            assert ('lm_head.weight' in keys) == ('model.norm.weight' in keys) == (p == layout.pp - 1)
            for t in range(layout.tp):
                coords = {'pp': p, 'tp': t, 'ep': e}
                got = read_rank_part(moe_checkpoint, spec, layout, coords)
                want = shard_state(full, spec, layout, p, t, e)
                assert sorted(got) == sorted(want)
                assert all(torch.equal(got[k], want[k]) for k in want)
    assert read == {k for k in all_keys if not k.endswith('rotary_emb.inv_freq')}  # together: everything


def test_tied_embedding_is_read_by_the_last_stage_too(tmp_path):
    folder = str(make_checkpoint('qwen3', tmp_path))
    spec = hf_to_spec(make_config('qwen3'))
    keys, _, _ = rank_hf_keys(hf_folder_keys(folder), spec, Layout(pp=2), pp_rank=1)
    assert 'model.embed_tokens.weight' in keys and 'model.norm.weight' in keys
    shard = read_rank_part(folder, spec, Layout(pp=2), {'pp': 1, 'tp': 0, 'ep': 0})
    assert 'output_layer.weight' in shard and 'embedding.word_embeddings.weight' not in shard
