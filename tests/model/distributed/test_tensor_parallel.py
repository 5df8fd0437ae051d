"""TransformersModel with tp_size=2 under torchrun (CPU, gloo, 2 processes) against one process on the
same global batch: losses, gradients, saved weights, resuming in one process, and the refusals."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _scenarios as S  # noqa: E402
from test_distributed import assert_close, torchrun  # noqa: E402

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name('tp_worker.py')
SCENARIOS = ['tp', 'tp_grads', 'tp_lora', 'tp_bad_heads', 'tp_no_plan']


@pytest.fixture(scope='module')
def tp_runs(tmp_path_factory) -> Dict[str, Any]:
    out = tmp_path_factory.mktemp('tp')
    proc = torchrun([str(WORKER), str(out), *SCENARIOS], env={}, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results: Dict[str, Any] = {name: [json.loads((out / f'{name}.rank{r}.json').read_text()) for r in (0, 1)]
                               for name in SCENARIOS}
    results['_out'] = out
    return results


@pytest.fixture(scope='module')
def single(tmp_path_factory) -> Dict[str, Any]:
    out = tmp_path_factory.mktemp('single')
    runs = {}
    for name, lora in (('full', False), ('lora', True)):
        model = S.build(None, lora=lora, output_dir=str(out / name))
        runs[name] = S.train(model, S.loader(None), S.STEPS, save_at=S.SAVE_AT)
        model.shutdown()
    return runs


@pytest.mark.parametrize('scenario, reference', [('tp', 'full'), ('tp_lora', 'lora')])
def test_tp_losses_match_one_process(tp_runs, single, scenario, reference):
    rank0, rank1 = tp_runs[scenario]
    assert rank0['losses'] == rank1['losses']
    assert_close(rank0['losses'][:4], single[reference]['losses'][:4])
    # Clipping saw the whole gradient: shards summed over tp, replicated parameters counted once.
    assert_close(rank0['grad_norms'], single[reference]['grad_norms'], rel=1e-4)


def test_tp_shards_the_plan_layers(tp_runs):
    # tiny-qwen3: 4 query heads of 64 -> 2 per rank; the LoRA factors follow their base layer.
    assert tp_runs['tp'][0]['strategy_cls'] == 'TensorParallelStrategy'
    assert tp_runs['tp'][0]['q_proj_local_shape'] == [128, 256]
    # Sharded and replicated parameters step per tensor: foreach kernels refuse the mix.
    assert tp_runs['tp'][0]['foreach_off']
    assert 'foreach=True cannot step a mix of DTensor' in tp_runs['tp'][0]['foreach_error']
    sharded = tp_runs['tp_lora'][0]['sharded']
    assert sharded['q_B'] == ['DTensor', [128, 4]] and sharded['o_A'] == ['DTensor', [4, 128]]
    assert sharded['q_A'][0] == sharded['o_B'][0] == 'Parameter'


def test_tp_gradients_match_one_process(tp_runs):
    import torch
    model = S.build(None)
    try:
        model.forward_backward(inputs=next(iter(S.loader(None))))
        expected = {n: p.grad for n, p in model.hf_model.named_parameters() if p.grad is not None}
    finally:
        model.shutdown()
    gathered = torch.load(tp_runs['_out'] / 'tp_grads.pt')
    assert gathered.keys() == expected.keys()
    for name, grad in expected.items():  # includes q_norm / k_norm, whose gradients are summed over tp
        # Gradients of summed losses reach ~10: compare against each tensor's largest entry.
        worst = float((gathered[name] - grad).abs().max() / grad.abs().max())
        assert worst < 1e-5, (name, worst)


def test_tp_checkpoint_is_full_and_loads_with_transformers(tp_runs, single):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    folder = Path(tp_runs['tp'][0]['checkpoint'])
    saved = load_file(str(folder / 'model.safetensors'))
    reference = load_file(str(Path(single['full']['checkpoint']) / 'model.safetensors'))
    assert saved.keys() == reference.keys()
    for key, value in reference.items():
        # Full (gathered) shapes; values within Adam's amplification of rounding-level gradient differences.
        torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=2e-5, msg=key)
    plain = AutoModelForCausalLM.from_pretrained(str(folder))
    torch.testing.assert_close(plain.model.layers[0].self_attn.q_proj.weight,
                               saved['model.layers.0.self_attn.q_proj.weight'])
    adapter = load_file(str(Path(tp_runs['tp_lora'][0]['checkpoint']) / 'adapter_model.safetensors'))
    adapter_ref = load_file(str(Path(single['lora']['checkpoint']) / 'adapter_model.safetensors'))
    assert adapter.keys() == adapter_ref.keys()
    for key, value in adapter_ref.items():
        torch.testing.assert_close(adapter[key], value, rtol=1e-4, atol=5e-5, msg=key)


@pytest.mark.parametrize('lora', [False, True])
def test_resume_tp_checkpoint_in_one_process(tp_runs, single, lora):
    checkpoint = tp_runs['tp_lora' if lora else 'tp'][0]['checkpoint']
    model = S.build(None, lora=lora)
    try:
        resumed = S.resume(model, checkpoint)
    finally:
        model.shutdown()
    assert resumed['resumed_step'] == S.SAVE_AT
    assert_close(resumed['losses'], single['lora' if lora else 'full']['losses'][S.SAVE_AT:], rel=1e-4)


def test_resume_tp_checkpoint_in_the_same_layout(tp_runs):
    rank0 = tp_runs['tp'][0]
    assert rank0['resumed']['step'] == S.SAVE_AT
    assert_close(rank0['resumed']['losses'], rank0['losses'][S.SAVE_AT:])


def test_tp_refuses_indivisible_heads_and_models_without_plan(tp_runs):
    error = tp_runs['tp_bad_heads'][0]['error']
    assert error.startswith('ValueError') and 'num_key_value_heads=1' in error and 'tp_size=2' in error
    error = tp_runs['tp_no_plan'][0]['error']
    assert error.startswith('NotImplementedError') and 'no tensor-parallel plan' in error
