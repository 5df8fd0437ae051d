"""The data-parallel layouts the README documents, checked on the wrapped module under torchrun (4 ranks):
``dp_size`` with native_fsdp shards over every rank, ``dp_size x fsdp_size`` is HSDP, ``mixed_precision='bf16'``
becomes FSDP2's MixedPrecisionPolicy (bf16 compute, fp32 gradient reduction), and ``fsdp_config`` /
``ddp_config`` reach the wrappers."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow
WORLD = 4


@pytest.fixture(scope='module')
def ranks(layouts_out):  # the launch (conftest.py) also runs the tensor x FSDP2 layouts of test_tp_fsdp.py
    return [json.loads((layouts_out / f'rank{r}.json').read_text()) for r in range(WORLD)]


def _same_loss_everywhere(ranks, scenario):
    # Every rank reports the figure of the whole global batch.
    losses = [r[scenario]['loss'] for r in ranks]
    assert losses[0] > 0 and all(abs(v - losses[0]) <= 1e-6 * losses[0] for v in losses), losses


def test_dp_size_with_native_fsdp_shards_over_every_rank(ranks):
    for r in ranks:
        facts = r['fsdp_dp4']
        assert facts['sharded'] and facts['mesh_dims'] == ['dp'] and facts['mesh_shape'] == [WORLD]
        assert facts['placements'] == ['Shard']
        assert facts['local_rows'] == -(-facts['full_rows'] // WORLD)
        # No bf16 asked for: no parameter cast, everything fp32.
        assert facts['param_dtype'] == 'None' and facts['forward_dtypes'] == ['torch.float32']
        assert facts['reshard_after_forward'] is True and facts['stepped']
    _same_loss_everywhere(ranks, 'fsdp_dp4')


def test_hsdp_bf16_policy_and_fsdp_config(ranks):
    for r in ranks:
        facts = r['hsdp_bf16']
        # Replicated over dp, sharded over fsdp.
        assert facts['mesh_dims'] == ['dp', 'fsdp'] and facts['mesh_shape'] == [2, 2]
        assert facts['placements'] == ['Replicate', 'Shard']
        assert facts['local_rows'] == -(-facts['full_rows'] // 2)
        # bf16 -> MixedPrecisionPolicy: bf16 compute on fp32 master weights, fp32 gradient reduction.
        assert facts['param_dtype'] == 'torch.bfloat16' and facts['reduce_dtype'] == 'torch.float32'
        assert facts['forward_dtypes'] == ['torch.bfloat16'] and facts['weight_dtype'] == 'torch.float32'
        assert facts['grad_dtype'] == 'torch.float32' and facts['grad_is_dtensor']
        # fsdp_config={'reshard_after_forward': False} reached fully_shard.
        assert facts['reshard_after_forward'] is False and facts['stepped']
    _same_loss_everywhere(ranks, 'hsdp_bf16')


def test_ddp_config_reaches_ddp(ranks):
    for r in ranks:
        facts = r['ddp_config']
        assert facts['ddp'] and facts['strategy'] == 'AccelerateDDPStrategy'
        assert facts['find_unused_parameters'] is True and facts['bucket_bytes_cap'] == 1024 * 1024
    _same_loss_everywhere(ranks, 'ddp_config')
