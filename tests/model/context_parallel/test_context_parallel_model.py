"""TransformersModel with cp_size=2 (torchrun, gloo: 2 processes, and 4 with fsdp_size=2) against one
process on the same global batches."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from launch import assert_ok, torchrun

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'distributed'))
import _scenarios as S  # noqa: E402

WORKER = Path(__file__).with_name('cp_worker.py')
SCENARIOS = {'cp_fsdp': ('full', 'FSDP2Strategy'), 'cp_fsdp_lora': ('lora', 'FSDP2Strategy'),
             'cp_ddp': ('full', 'AccelerateDDPStrategy'), 'cp_fsdp_ckpt': ('full', 'FSDP2Strategy'),
             'fsdp2_cp2': ('full', 'FSDP2Strategy')}
PROCESSES = {'cp': 2, 'fsdp_cp': 4}


@pytest.fixture(scope='module')
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp('single')
    runs = {}
    for name, lora in (('full', False), ('lora', True)):
        model = S.build(None, lora=lora, output_dir=str(out / name))
        runs[name] = S.train(model, S.loader(None), S.STEPS, save_at=S.SAVE_AT if name == 'full' else None)
        model.shutdown()
    return runs


@pytest.fixture(scope='module')
def runs(single, tmp_path_factory):  # after single: the embedded model is then materialised once
    out = tmp_path_factory.mktemp('cp')
    for layout, processes in PROCESSES.items():
        assert_ok(torchrun([WORKER, out, layout], nproc=processes))
    return {name: [json.loads((out / f'{name}.rank{r}.json').read_text()) for r in (0, 1)] for name in SCENARIOS}


@pytest.mark.slow
@pytest.mark.parametrize('scenario', list(SCENARIOS))
def test_cp2_losses_equal_one_process(runs, single, scenario):
    reference, strategy_cls = SCENARIOS[scenario]
    rank0, rank1 = runs[scenario]
    assert rank0['strategy_cls'] == strategy_cls
    assert rank0['losses'] == rank1['losses']  # global figures, counted once per cp group
    expected = single[reference]['losses']
    for step, (got, want) in enumerate(zip(rank0['losses'], expected), 1):
        assert abs(got - want) <= 1e-5 * abs(want), f'step {step}: {got} vs {want}'
    for got, want in zip(rank0['grad_norms'], single[reference]['grad_norms']):
        assert abs(got - want) <= 1e-4 * abs(want)
    assert abs(rank0['metric']['loss'] - single[reference]['metric']['loss']) < 1e-5


def test_left_padding_and_packing_are_refused():
    from twinkle.model.forward_seam import check_batch as _check_batch
    ids = torch.ones(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match='left padding'):
        _check_batch({'input_ids': ids, 'attention_mask': torch.tensor([[0, 0, 1, 1, 1, 1]])})
    with pytest.raises(ValueError, match='padding-free packing'):
        _check_batch({'input_ids': ids, 'position_ids': torch.tensor([[0, 1, 2, 0, 1, 2]])})
    _check_batch({'input_ids': ids, 'attention_mask': torch.tensor([[1, 1, 1, 1, 0, 0]]),
                  'position_ids': torch.tensor([[0, 1, 2, 3, 0, 0]])})  # right padding is fine


@pytest.mark.slow
def test_cp_fsdp_checkpoint_resumes_in_layout_and_in_one_process(runs, single):
    from _resume_checks import check_layout_checkpoint
    check_layout_checkpoint(runs['cp_fsdp'], single['full'])


@pytest.mark.slow
def test_cp2_adapter_added_after_sharding_trains_as_in_one_process(runs):
    # Each rank runs part of every sequence; FSDP2 averages over every rank of the mesh, the late adapter's
    # gradients must be averaged over the same ranks (the window multiplies by grad_reduce_world).
    from _late_adapter import check_ranks_train_as_alone
    check_ranks_train_as_alone(runs['cp_fsdp_lora'])
