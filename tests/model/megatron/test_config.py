from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from twinkle.hub import resolve
from twinkle.mesh import DeviceMesh
from twinkle.model.megatron.config import check_overrides, hf_to_spec

from .conftest import needs_megatron
from .tiny import make_checkpoint, make_config


def test_qwen3_mapping():
    spec = hf_to_spec(AutoConfig.from_pretrained(resolve('builtin://tiny-qwen3')), tp_size=1)
    t = spec.transformer
    assert (t['num_layers'], t['hidden_size'], t['num_attention_heads'], t['num_query_groups']) == (4, 256, 4, 2)
    assert t['kv_channels'] == 64 and t['ffn_hidden_size'] == 768 and t['qk_layernorm'] is True
    assert t['add_qkv_bias'] is False and t['layernorm_epsilon'] == 1e-6
    assert spec.rotary_base == 1e6 and spec.tie_word_embeddings and spec.vocab_size == 4096


def test_qwen2_has_qkv_bias_and_llama_not():
    assert hf_to_spec(make_config('qwen2')).transformer['add_qkv_bias'] is True
    llama = hf_to_spec(make_config('llama'))
    assert llama.transformer['add_qkv_bias'] is False and llama.transformer['qk_layernorm'] is False
    assert llama.transformer['kv_channels'] == 8  # hidden / heads when head_dim is not set


def test_moe_mapping():
    spec = hf_to_spec(make_config('qwen3_moe'))
    t = spec.transformer
    assert spec.num_experts == 4 and t['num_moe_experts'] == 4 and t['moe_router_topk'] == 2
    assert t['moe_ffn_hidden_size'] == 16 and t['moe_router_pre_softmax'] is False
    assert 'moe_layer_freq' not in t


def test_vocab_padding_to_tp_multiple():
    cfg = make_config('llama')
    cfg.vocab_size = 97
    assert hf_to_spec(cfg, tp_size=2).padded_vocab_size == 98
    assert hf_to_spec(cfg, tp_size=1).padded_vocab_size == 97


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config
    with pytest.raises(NotImplementedError, match="'gpt2'"):
        hf_to_spec(GPT2Config())


def test_override_errors_list_close_matches():
    known = {'num_layers': None, 'hidden_size': None, 'recompute_granularity': None}
    with pytest.raises(ValueError, match='did you mean recompute_granularity'):
        check_overrides({'recompute_granularty': 'full'}, known)
    with pytest.raises(ValueError, match='tp_size'):
        check_overrides({'tensor_model_parallel_size': 2}, known)
    with pytest.raises(ValueError, match='VPP'):
        check_overrides({'virtual_pipeline_model_parallel_size': 2}, known)
    check_overrides({'recompute_granularity': 'full'}, known)


@needs_megatron
def test_unknown_transformer_config_field():
    from twinkle.model.megatron.config import build_transformer_config
    spec = hf_to_spec(make_config('llama'))
    with pytest.raises(ValueError, match='attention_dropout'):
        build_transformer_config(spec, {}, 'no', {'attention_dropuot': 0.1})
    config = build_transformer_config(spec, {}, 'no', {'attention_dropout': 0.25})
    assert config.attention_dropout == 0.25 and config.num_query_groups == 2


@needs_megatron
@pytest.mark.parametrize('model_type', ['qwen3', 'llama', 'qwen2', 'qwen3_moe'])
def test_megatron_logits_match_transformers(model_type, megatron_cpu, tmp_path):
    """The converted weights in megatron-core's own GPT model give Hugging Face's logits."""
    from twinkle.model.megatron import parallel
    from twinkle.model.megatron._compat import require_megatron
    from twinkle.model.megatron.builder import build_gpt, load_hf_weights
    from twinkle.model.megatron.config import build_transformer_config

    require_megatron()
    folder = resolve('builtin://tiny-qwen3') if model_type == 'qwen3' else \
        str(make_checkpoint(model_type, tmp_path))
    hf_config = AutoConfig.from_pretrained(folder)
    mesh = DeviceMesh.from_sizes()
    parallel.initialize(mesh)
    spec = hf_to_spec(hf_config)
    config = build_transformer_config(spec, parallel.config_kwargs(mesh), 'no', use_cpu_initialization=True)
    gpt = build_gpt(spec, config)
    load_hf_weights(gpt, folder, spec, config, parallel.coords())
    ids = torch.randint(3, hf_config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    causal = torch.ones(9, 9, dtype=torch.bool).triu(1)[None, None].expand(2, 1, 9, 9)
    pos = torch.arange(9).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        mc_logits = gpt(ids, pos, causal)
        hf_logits = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(mc_logits[..., :hf_config.vocab_size], hf_logits, rtol=1e-4, atol=1e-4)


def test_missing_megatron_core_gives_install_hint(monkeypatch):
    from twinkle.model.megatron import _compat
    monkeypatch.setattr(_compat, 'megatron_available', lambda: False)
    with pytest.raises(ImportError, match=r'pip install "twinkle\[megatron\]"'):
        _compat.require_megatron()
    import twinkle.model
    with pytest.raises(ImportError, match='megatron-core'):
        _ = twinkle.model.MegatronModel
