"""Activation checkpointing under FSDP2 (torchrun, gloo, 2 processes): the same losses and gradients
as without, each layer recomputed once in the backward."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch import assert_ok, torchrun

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name('ckpt_worker.py')


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp('ckpt')
    assert_ok(torchrun([WORKER, out]))
    return [json.loads((out / f'rank{r}.json').read_text()) for r in (0, 1)]


@pytest.mark.parametrize('kind', ['full', 'lora'])
def test_fsdp2_checkpointing_keeps_losses_and_gradients(results, kind):
    for rank in results:
        run = rank[kind]
        assert run['ckpt_losses'] == pytest.approx(run['plain_losses'], rel=1e-5)
        assert run['num_grads'] > 0
        assert run['max_grad_diff'] <= 1e-5 * max(run['max_grad'], 1e-3), run
        assert run['lora_only'] is (kind == 'lora')
        assert run['plain_calls'] == run['layers'] and run['ckpt_calls'] == 2 * run['layers']
    assert results[0][kind]['ckpt_losses'] == results[1][kind]['ckpt_losses']  # global figures
