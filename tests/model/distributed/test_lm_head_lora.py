"""LoRA with ``modules_to_save=['lm_head']`` under FSDP2 and DDP (torchrun, 2 gloo processes on CPU):
the adapter saves, equals the one-process adapter, loads into PEFT, and resumes across layouts."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import _lm_head_lora as L  # noqa: E402
import _scenarios as S  # noqa: E402
from test_distributed import _same_on_both_ranks, assert_close, torchrun  # noqa: E402

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name('lm_head_worker.py')
SCENARIOS = ['fsdp', 'ddp', 'fsdp_resume']
ADAPTER = 'adapter_model.safetensors'
HEAD = 'base_model.model.lm_head.weight'


@pytest.fixture(scope='module')
def single(tmp_path_factory) -> Dict[str, Any]:
    out = tmp_path_factory.mktemp('single')
    model = L.build(None, output_dir=str(out))
    result = S.train(model, S.loader(None), L.STEPS, save_at=L.SAVE_AT, save_name='step2')
    result['final'] = model.save('final')
    model.shutdown()
    return result


@pytest.fixture(scope='module')
def runs(single, tmp_path_factory) -> Dict[str, Any]:
    out = tmp_path_factory.mktemp('dist')
    proc = torchrun([str(WORKER), str(out), *SCENARIOS], timeout=400,
                    env={'TWINKLE_TEST_SINGLE_CHECKPOINT': single['checkpoint']})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {name: [json.loads((out / f'{name}.rank{r}.json').read_text()) for r in (0, 1)] for name in SCENARIOS}


def _assert_same_adapter(folder: str, reference: str) -> None:
    got, want = load_file(str(Path(folder) / ADAPTER)), load_file(str(Path(reference) / ADAPTER))
    assert got.keys() == want.keys() and HEAD in got
    for key, value in want.items():
        # Adam turns rounding-level gradient differences into a few % of one step where a gradient is near 0.
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=2e-5, msg=key)


@pytest.mark.parametrize('scenario', ['fsdp', 'ddp'])
def test_two_ranks_save_the_one_process_adapter(runs, single, scenario):
    pair = runs[scenario]
    assert_close(_same_on_both_ranks(pair), single['losses'])
    _assert_same_adapter(pair[0]['checkpoint'], single['checkpoint'])
    _assert_same_adapter(pair[0]['final'], single['final'])


def test_saved_adapter_loads_into_peft(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from twinkle.hub import resolve
    folder = runs['fsdp'][0]['final']
    saved = load_file(str(Path(folder) / ADAPTER))
    base = AutoModelForCausalLM.from_pretrained(resolve(S.MODEL_ID))
    original_head = base.lm_head.weight.detach().clone()
    peft = PeftModel.from_pretrained(base, folder)
    torch.testing.assert_close(peft.base_model.model.lm_head.modules_to_save['default'].weight, saved[HEAD],
                               rtol=0, atol=0)
    assert not torch.equal(saved[HEAD], original_head)  # the copy was trained
    assert peft(input_ids=torch.tensor([[5, 6, 7]])).logits.shape[-1] == saved[HEAD].shape[0]


def test_one_process_checkpoint_resumes_on_two_sharded_ranks(runs, single):
    pair = runs['fsdp_resume']
    assert pair[0]['resumed_step'] == L.SAVE_AT
    assert_close(_same_on_both_ranks(pair), single['losses'][L.SAVE_AT:])
    _assert_same_adapter(pair[0]['final'], single['final'])
