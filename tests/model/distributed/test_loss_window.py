"""The window contract (twinkle.loss.base) across two ranks: DDP and FSDP2 give, for every loss and
reduction, the gradient and figures one process gets from the same rows as one batch, with uneven token
counts per micro-batch and per rank; 'sum' losses are global sums (not divided by ranks or micro-batches)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _loss_window as W  # noqa: E402
from test_distributed import torchrun  # noqa: E402

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name('loss_window_worker.py')


@pytest.fixture(scope='module')
def reference() -> Dict[str, Any]:
    data = W.samples()
    model = W.build()
    try:
        out = {}
        for name in W.LOSS_NAMES:
            parts = W.ALL_PARTS if name == 'bnpo' else [(0, len(data))]
            out[name] = W.window(model, name, W.slices(data, parts))
    finally:
        model.shutdown()
    return out


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> Dict[str, Any]:
    out = tmp_path_factory.mktemp('loss_window')
    proc = torchrun([str(WORKER), str(out)], env={}, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {layout: [json.loads((out / f'{layout}.rank{r}.json').read_text()) for r in (0, 1)]
            for layout in ('ddp', 'fsdp')}


def assert_same_gradient(got: Dict[str, Any], want: Dict[str, Any], what: str) -> None:
    assert got.keys() == want.keys(), what
    for key, (dot, norm) in want.items():
        g_dot, g_norm = got[key]
        assert abs(g_norm - norm) <= 1e-5 * norm + 1e-12, (what, key, g_norm, norm)
        assert abs(g_dot - dot) <= 1e-4 * norm + 1e-12, (what, key, g_dot, dot)


@pytest.mark.parametrize('layout, strategy_cls', [('ddp', 'AccelerateDDPStrategy'), ('fsdp', 'FSDP2Strategy')])
@pytest.mark.parametrize('name', W.LOSS_NAMES)
def test_two_ranks_give_the_one_batch_gradient(runs, reference, layout, strategy_cls, name):
    pair = runs[layout]
    assert pair[0]['strategy_cls'] == strategy_cls
    want = reference[name]
    for rank in (0, 1):
        got = pair[rank][name]
        assert_same_gradient(got['prints'], want['prints'], f'{layout} rank {rank} {name}')
        # The reported figures are global ones: the window's weighted metrics and its loss.
        for key, value in want['metric'].items():
            if key in ('step', 'micro_step', 'grad_norm', 'lr'):
                continue
            assert got['metric'][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (layout, name, key)
        if name in W.SUM_LOSSES:
            assert sum(got['losses']) == pytest.approx(sum(want['losses']), rel=1e-5)
        # Gradient norms in float64: the strategy's equals a float64 norm of the same gradients.
        assert abs(got['norm'] - got['norm64']) <= 1e-12 * got['norm64']
