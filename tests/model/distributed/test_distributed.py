"""TransformersModel under torchrun on CPU (gloo, 2 processes) against one process on the same global batch.

One torchrun launch runs every training scenario (dist_worker.py) and writes JSON per rank; the
single-process reference runs here, in the test process. A second launch checks that a failing rank
ends the job.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _scenarios as S  # noqa: E402

from launch import torchrun  # noqa: E402,F401  (other test modules import it from here)

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name('dist_worker.py')
SCENARIOS = ['meminit_big', 'meminit', 'ddp', 'fsdp', 'fsdp_lora', 'fsdp_accum', 'ddp_accum', 'accelerate_fsdp',
             'resume_full', 'resume_lora', 'resume_ddp']




def assert_close(actual: List[float], expected: List[float], rel: float = 1e-5) -> None:
    assert len(actual) == len(expected), (actual, expected)
    for step, (a, e) in enumerate(zip(actual, expected), 1):
        assert abs(a - e) <= rel * abs(e), f'step {step}: {a} vs {e} (relative {abs(a - e) / abs(e):.2e})'


@pytest.fixture(scope='module')
def single(tmp_path_factory) -> Dict[str, Any]:
    """Reference runs in this process (full and LoRA), each saving a resumable checkpoint at SAVE_AT."""
    out = tmp_path_factory.mktemp('single')
    runs = {}
    for name, lora in (('full', False), ('lora', True)):
        model = S.build(None, lora=lora, output_dir=str(out))
        runs[name] = S.train(model, S.loader(None), S.STEPS, save_at=S.SAVE_AT, save_name=name)
        model.shutdown()
    model = S.build(None)
    runs['accum'] = S.train(model, S.loader(None), S.STEPS, accumulate=S.ACCUMULATE)
    model.shutdown()
    return runs


@pytest.fixture(scope='module')
def big_model(tmp_path_factory) -> str:
    """A ~52M-parameter Qwen3 (random weights): big enough that the process's fixed memory noise (tens of
    MB of lazily imported modules and allocator slack) is small against one shard."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from twinkle.hub import resolve
    base = AutoConfig.from_pretrained(resolve(S.MODEL_ID))
    sizes = {**base.to_dict(), 'hidden_size': 512, 'intermediate_size': 1536, 'num_hidden_layers': 16,
             'num_attention_heads': 8, 'num_key_value_heads': 4, 'max_window_layers': 16}
    sizes.pop('layer_types', None)  # derived from the layer count
    config = type(base)(**sizes)
    folder = tmp_path_factory.mktemp('big-qwen3')
    AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope='module')
def runs(single, big_model, tmp_path_factory) -> Dict[str, List[Dict[str, Any]]]:
    out = tmp_path_factory.mktemp('dist')
    proc = torchrun([str(WORKER), str(out), *SCENARIOS], timeout=540, env={
        'TWINKLE_TEST_SINGLE_FULL': single['full']['checkpoint'],
        'TWINKLE_TEST_SINGLE_LORA': single['lora']['checkpoint'],
        'TWINKLE_TEST_BIG_MODEL': big_model})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert 'terminate called' not in proc.stderr, proc.stderr[-3000:]
    results = {name: [json.loads((out / f'{name}.rank{r}.json').read_text()) for r in (0, 1)] for name in SCENARIOS}
    results['_stderr'] = proc.stderr
    results['_out'] = out
    return results


def _same_on_both_ranks(pair: List[Dict[str, Any]], key: str = 'losses') -> List[float]:
    assert pair[0][key] == pair[1][key], 'the ranks report different global figures'
    return pair[0][key]


@pytest.mark.parametrize('scenario, reference, strategy_cls', [
    ('ddp', 'full', 'AccelerateDDPStrategy'),
    ('fsdp', 'full', 'FSDP2Strategy'),
    ('fsdp_lora', 'lora', 'FSDP2Strategy'),
    ('meminit', 'full', 'FSDP2Strategy'),
    ('fsdp_accum', 'accum', 'FSDP2Strategy'),
    ('ddp_accum', 'accum', 'AccelerateDDPStrategy'),
])
def test_per_step_losses_match_one_process(runs, single, scenario, reference, strategy_cls):
    pair = runs[scenario]
    assert pair[0]['strategy_cls'] == strategy_cls
    assert_close(_same_on_both_ranks(pair), single[reference]['losses'])
    # Clipping saw the norm of the whole gradient, not of one rank's shard.
    assert_close(_same_on_both_ranks(pair, 'grad_norms'), single[reference]['grad_norms'], rel=1e-4)
    for rank in (0, 1):  # metrics are reduced over the ranks: each reports the global figure
        assert abs(pair[rank]['metric']['loss'] - single[reference]['metric']['loss']) < 1e-5


def test_accelerate_fsdp_on_cpu_runs_native_fsdp2(runs, single):
    pair = runs['accelerate_fsdp']
    # accelerate would silently fall back to DDP on CPU: the sharded layout the mesh asks for is kept.
    assert pair[0]['strategy_cls'] == 'FSDP2Strategy' and pair[0]['sharded'] and pair[1]['sharded']
    assert 'native FSDP2 strategy' in runs['_stderr']
    assert_close(_same_on_both_ranks(pair), single['full']['losses'])


def test_memory_efficient_init_keeps_other_ranks_near_one_shard(runs):
    for scenario in ('meminit', 'meminit_big'):
        rank0, rank1 = runs[scenario]
        assert rank1['built_param_bytes'] == 0  # built on the meta device
        assert rank0['built_param_bytes'] > 0
        assert rank0['shard_param_bytes'] == rank1['shard_param_bytes'] == rank0['built_param_bytes'] // 2
    rank0, rank1 = runs['meminit_big']
    full = rank0['full_param_bytes']
    assert full > 200e6
    # Rank 0 holds the whole model while it hands out the shards; rank 1 never more than about one shard.
    assert rank0['peak_rss_delta'] > full, rank0
    assert rank1['peak_rss_delta'] < 0.75 * full, rank1


def test_fsdp_adapter_added_after_sharding_trains_as_in_one_process(runs):
    """FSDP2 shards an adapter's weights only if it existed at the first forward; one added later is plain on
    every rank and its gradients must still be averaged over the ranks, or each rank trains its own copy."""
    import torch
    from _late_adapter import alone
    from safetensors.torch import load_file
    reference = alone()
    late = [r['late'] for r in runs['fsdp_lora']]
    assert late[0]['q_B'] is None  # not sharded: FSDP2 had wrapped the model before the adapter came
    assert late[0]['digest'] == late[1]['digest'], 'the ranks hold different copies of the late adapter'
    assert_close(_same_on_both_ranks(late), reference['losses'], rel=1e-5)  # not averaged: 9e-5, 2e-3 off
    weights = load_file(str(runs['_out'] / 'fsdp_lora_late.rank0.safetensors'))
    assert weights.keys() == reference['weights'].keys()
    for key, value in reference['weights'].items():
        # Adam's steps (lr 2e-2) turn rounding-level gradient differences into up to ~8e-5 where a gradient
        # is near zero; not averaged, the weights are up to 0.12 off (whole steps the other way).
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=2e-4, msg=key)


@pytest.mark.parametrize('scenario, reference', [('fsdp', 'full'), ('fsdp_lora', 'lora'), ('ddp', 'full')])
def test_resume_two_ranks_to_one(runs, single, scenario, reference):
    checkpoint = runs[scenario][0]['checkpoint']
    model = S.build(None, lora=reference == 'lora')
    try:
        resumed = S.resume(model, checkpoint)
    finally:
        model.shutdown()
    assert resumed['resumed_step'] == S.SAVE_AT
    assert_close(resumed['losses'], single[reference]['losses'][S.SAVE_AT:])


def test_checkpoint_from_two_ranks_is_a_plain_model_folder(runs, single):
    import torch
    from safetensors.torch import load_file
    dist_weights = load_file(str(Path(runs['fsdp'][0]['checkpoint']) / 'model.safetensors'))
    one_weights = load_file(str(Path(single['full']['checkpoint']) / 'model.safetensors'))
    assert dist_weights.keys() == one_weights.keys()
    for key, value in one_weights.items():
        # Adam turns rounding-level gradient differences into up to a few % of one step (lr 5e-4) where
        # a gradient is near zero; anything like a wrong update would differ by whole steps.
        torch.testing.assert_close(dist_weights[key], value, rtol=1e-4, atol=2e-5)
    config = json.loads((Path(runs['fsdp'][0]['checkpoint']) / 'config.json').read_text())
    assert config['architectures'] == ['Qwen3ForCausalLM']


@pytest.mark.parametrize('scenario, reference', [('resume_full', 'full'), ('resume_lora', 'lora'),
                                                 ('resume_ddp', 'full')])
def test_resume_one_rank_to_two(runs, single, scenario, reference):
    pair = runs[scenario]
    assert pair[0]['resumed_step'] == S.SAVE_AT
    assert_close(_same_on_both_ranks(pair), single[reference]['losses'][S.SAVE_AT:])


def test_failing_rank_ends_every_rank(tmp_path):
    started = time.monotonic()
    proc = torchrun([str(WORKER), str(tmp_path), 'fail'], env={}, timeout=240)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert 'rank 1 failed on purpose' in proc.stderr, proc.stderr[-3000:]
    assert 'rank 0 trained one step' in proc.stdout  # rank 0 was alive and in training when rank 1 died
    # Rank 0 is left waiting in a gradient all-reduce rank 1 never joins; torchrun must stop it long
    # before the collective timeout (300 s).
    assert elapsed < 90, elapsed
