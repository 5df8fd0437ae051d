"""The device mesh the ``mesh`` option places the served model on, and the start-time check of ``tp``
against the model, without starting any rank."""
from __future__ import annotations

import pytest

from twinkle.server.config import ConfigError
from twinkle.server.distributed_host import build_mesh, check_tensor_parallel


def test_fsdp_by_tp_mesh_keeps_the_tensor_parallel_ranks_adjacent():
    mesh = build_mesh({'fsdp': 2, 'tp': 2})
    assert (mesh.world_size, mesh.fsdp_size, mesh.tp_size, mesh.dp_size) == (4, 2, 2, 1)
    # Each FSDP2 shard is split over two neighbouring ranks; FSDP2 shards across the pairs.
    assert mesh.all_groups('tp') == [[0, 1], [2, 3]]
    assert mesh.all_groups('fsdp') == [[0, 2], [1, 3]]


@pytest.mark.parametrize('sizes, expected', [({'tp': 2}, (2, 1, 2)), ({'fsdp': 2}, (2, 2, 1)),
                                             ({'fsdp': 1, 'tp': 4}, (4, 1, 4))])
def test_mesh_of_one_axis(sizes, expected):
    mesh = build_mesh(sizes)
    assert (mesh.world_size, mesh.fsdp_size, mesh.tp_size) == expected


class _SplitOver:
    """The part of a TensorParallelStrategy the check reads, without a process group."""

    def __init__(self, tp: int) -> None:
        self.mesh = build_mesh({'tp': tp})

    def check_model(self, config) -> None:
        from twinkle.model.transformers.distributed import TensorParallelStrategy
        TensorParallelStrategy.check_model(self, config)  # type: ignore[arg-type]


def test_a_tp_size_the_model_cannot_split_by_stops_the_start():
    from transformers import AutoConfig

    from twinkle.hub import resolve
    config = AutoConfig.from_pretrained(resolve('builtin://tiny-qwen3'))  # 4 query heads, 2 key/value heads
    check_tensor_parallel(_SplitOver(2), config)
    check_tensor_parallel(object(), config)  # FSDP2 alone: nothing to check
    with pytest.raises(ConfigError, match=r'mesh tp=4 does not fit the served model: .*num_key_value_heads=2.*'
                                          r'server option mesh \(--mesh\)'):
        check_tensor_parallel(_SplitOver(4), config)
    with pytest.raises(ConfigError, match=r'mesh tp=3 .*num_attention_heads=4'):
        check_tensor_parallel(_SplitOver(3), config)
    config.base_model_tp_plan = None
    with pytest.raises(ConfigError, match=r'mesh tp=2 .*no tensor-parallel plan'):
        check_tensor_parallel(_SplitOver(2), config)
