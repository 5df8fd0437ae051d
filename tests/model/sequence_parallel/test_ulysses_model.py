"""TransformersModel with ulysses_size=2 (torchrun, gloo: 2 processes, and 4 with fsdp_size=4) against
one process on the same global batches; with ulysses_size=4 the model's 2 key/value heads are replicated."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from launch import assert_ok, torchrun

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'distributed'))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _rl  # noqa: E402
import _scenarios as S  # noqa: E402

WORKER = Path(__file__).with_name('ulysses_worker.py')
# scenario: (reference run in one process, strategy class, processes)
SCENARIOS = {'sp_fsdp': ('full', 'FSDP2Strategy', 2), 'sp_fsdp_lora': ('lora', 'FSDP2Strategy', 2),
             'sp_ddp_grpo': ('full_grpo', 'AccelerateDDPStrategy', 2),
             'sp_fsdp_lora_grpo': ('lora_grpo', 'FSDP2Strategy', 2),
             'sp_fsdp_packed': ('full_packed', 'FSDP2Strategy', 2),
             'sp_fsdp_ckpt': ('full', 'FSDP2Strategy', 2),
             'fsdp4_sp2': ('full', 'FSDP2Strategy', 4), 'fsdp4_sp4': ('full', 'FSDP2Strategy', 4)}
PROCESSES = {'sp': 2, 'fsdp_sp': 4}


@pytest.fixture(scope='module')
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp('single')
    runs = {}
    for name, lora, grpo, packed in (('full', False, False, False), ('lora', True, False, False),
                                     ('full_grpo', False, True, False), ('lora_grpo', True, True, False),
                                     ('full_packed', False, False, True)):
        model = S.build(None, lora=lora, output_dir=str(out / name))
        if grpo:
            _rl.use_grpo(model)
        if packed:
            _rl.use_padding_free(model)
        runs[name] = S.train(model, _rl.loader(None) if grpo else S.loader(None), S.STEPS,
                             save_at=S.SAVE_AT if name == 'full' else None)
        model.shutdown()
    return runs


@pytest.fixture(scope='module')
def runs(single, tmp_path_factory):  # after single: the embedded model is then materialised once
    out = tmp_path_factory.mktemp('sp')
    for layout, processes in PROCESSES.items():
        assert_ok(torchrun([WORKER, out, layout], nproc=processes))
    return {name: [json.loads((out / f'{name}.rank{r}.json').read_text()) for r in range(processes)]
            for name, (_, _, processes) in SCENARIOS.items()}


@pytest.mark.slow
@pytest.mark.parametrize('scenario', list(SCENARIOS))
def test_ulysses2_losses_equal_one_process(runs, single, scenario):
    reference, strategy_cls, _ = SCENARIOS[scenario]
    ranks = runs[scenario]
    assert ranks[0]['strategy_cls'] == strategy_cls
    assert ranks[0]['sp_forward'] == 'UlyssesForward'
    assert ranks[0]['block_mask'] == (reference == 'full_packed')  # right-padded rows need no mask
    for other in ranks[1:]:
        assert other['losses'] == ranks[0]['losses']  # global figures, counted once per ulysses group
    expected = single[reference]['losses']
    assert len(ranks[0]['losses']) == len(expected) == S.STEPS
    for step, (got, want) in enumerate(zip(ranks[0]['losses'], expected), 1):
        assert abs(got - want) <= 1e-5 * max(abs(want), 1e-3), f'step {step}: {got} vs {want}'
    for got, want in zip(ranks[0]['grad_norms'], single[reference]['grad_norms']):
        assert abs(got - want) <= 1e-4 * abs(want)


@pytest.mark.slow
def test_sp_fsdp_checkpoint_resumes_in_layout_and_in_one_process(runs, single):
    from _resume_checks import check_layout_checkpoint
    check_layout_checkpoint(runs['sp_fsdp'], single['full'])


@pytest.mark.slow
def test_ulysses2_adapter_added_after_sharding_trains_as_in_one_process(runs):
    # Each rank runs part of every sequence; FSDP2 averages over every rank of the mesh, the late adapter's
    # gradients must be averaged over the same ranks (the window multiplies by grad_reduce_world).
    from _late_adapter import check_ranks_train_as_alone
    check_ranks_train_as_alone(runs['sp_fsdp_lora'])
