"""Expert parallelism on a tiny Qwen3-MoE: ep_size=2 over fsdp_size=2 under torchrun (CPU, gloo, 2 processes)
against one process on the same global batches: losses (router loss included), gradient norms, saved weights,
resuming in the same layout, and LoRA on the attention layers."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

from launch import assert_ok, torchrun

sys.path.insert(0, str(Path(__file__).parent))
import _moe  # noqa: E402
import _scenarios as S  # noqa: E402
from test_distributed import assert_close  # noqa: E402

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name('ep_worker.py')


@pytest.fixture(scope='module')
def ranks(tmp_path_factory) -> Any:
    out = tmp_path_factory.mktemp('ep')
    assert_ok(torchrun([WORKER, out], timeout=400))
    return [json.loads((out / f'ep.rank{r}.json').read_text()) for r in (0, 1)]


@pytest.fixture(scope='module')
def single(tmp_path_factory) -> Dict[str, Any]:
    model = _moe.build(None, output_dir=str(tmp_path_factory.mktemp('single')))
    try:
        return S.train(model, S.loader(None), S.STEPS, save_at=S.SAVE_AT)
    finally:
        model.shutdown()


@pytest.fixture(scope='module')
def single_lora(tmp_path_factory) -> Dict[str, Any]:
    model = _moe.build(None, output_dir=str(tmp_path_factory.mktemp('single_lora')), lora=True)
    try:
        return S.train(model, S.loader(None), 4)
    finally:
        model.shutdown()


def test_ep_losses_and_resume_match_one_process(ranks, single):
    rank0, rank1 = ranks
    assert rank0['losses'] == rank1['losses']
    # The router loss is part of every figure: computed on the global batch's statistics.
    assert rank0['metric']['aux_loss'] > 0
    assert_close(rank0['losses'][:4], single['losses'][:4])
    assert_close(rank0['grad_norms'], single['grad_norms'], rel=1e-5)
    assert rank0['resumed']['step'] == S.SAVE_AT
    assert_close(rank0['resumed']['losses'], rank0['losses'][S.SAVE_AT:])


def test_ep_splits_the_experts(ranks):
    facts = ranks[0]['experts']
    assert ranks[0]['strategy_cls'] == 'ExpertParallelStrategy'
    assert facts == {'cls': 'ExpertParallelExperts', 'dtensor': True, 'local_shape': [2, 64, 64],
                     'full_shape': [4, 64, 64]}


def test_ep_saved_weights_equal_one_process(ranks, single):
    import torch
    from safetensors.torch import load_file
    saved = load_file(str(Path(ranks[0]['checkpoint']) / 'model.safetensors'))
    reference = load_file(str(Path(single['checkpoint']) / 'model.safetensors'))
    assert saved.keys() == reference.keys()
    assert 'model.layers.1.mlp.experts.3.down_proj.weight' in saved  # every expert, gathered
    for key, value in reference.items():
        torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_ep_with_lora_on_attention_matches_one_process(ranks, single_lora):
    assert ranks[0]['lora']['losses'] == ranks[1]['lora']['losses']
    assert_close(ranks[0]['lora']['losses'], single_lora['losses'])
