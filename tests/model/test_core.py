"""The training core both backends share: the adapter rule, the shared methods defined once, and the
strategy's layout / communication split with its capability flags."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from twinkle.model.communication import Communication, LocalCommunication
from twinkle.model.core import TrainingCore, select_adapter
from twinkle.model.transformers.strategy import Layout, SingleProcessStrategy, Strategy

SHARED = ('_session', 'set_loss', 'add_metric', 'calculate_metric', 'clip_grad_and_step', 'save', 'load',
          'resume_from_checkpoint')


def test_adapter_rule():
    assert select_adapter([], None) is None                      # full-parameter training
    assert select_adapter(['a'], None) == 'a'                    # the only adapter
    assert select_adapter(['a', 'default'], None) == 'default'   # else the one named 'default'
    assert select_adapter(['a', 'b'], 'b') == 'b'
    with pytest.raises(ValueError, match='pass adapter_name='):
        select_adapter(['a', 'b'], None)


def test_transformers_model_uses_the_shared_core():
    from twinkle.model import TransformersModel
    assert issubclass(TransformersModel, TrainingCore)
    assert not [name for name in SHARED if name in vars(TransformersModel)]


def test_megatron_model_uses_the_shared_core():
    pytest.importorskip('megatron.core')
    from twinkle.model.megatron.model import MegatronModel
    assert issubclass(MegatronModel, TrainingCore)
    assert not [name for name in SHARED if name in vars(MegatronModel)]


def test_single_process_strategy_is_a_layout_and_a_communication(tmp_path: Path):
    strategy = SingleProcessStrategy()
    assert isinstance(strategy, Layout) and isinstance(strategy, Communication) and isinstance(strategy, Strategy)
    assert strategy.mesh is None and strategy.head_outside_forward
    value = torch.tensor([1.5, 2.0], dtype=torch.float64)
    assert torch.equal(strategy.reduce_sum(value), value) and strategy.gather_object('x') == ['x']
    with strategy.shared_folder(tmp_path / 'ckpt') as folder:
        (folder / 'f.txt').write_text('written')
    assert (tmp_path / 'ckpt' / 'f.txt').read_text() == 'written'
    assert isinstance(LocalCommunication(), Communication)


def test_fsdp2_says_its_output_head_is_sharded_outside_the_forward():
    from twinkle.model.transformers.distributed.ddp import DDPStrategy
    from twinkle.model.transformers.distributed.fsdp2 import FSDP2Strategy
    from twinkle.model.transformers.distributed.tensor_parallel import TensorParallelStrategy
    assert FSDP2Strategy.head_outside_forward is False
    assert DDPStrategy.head_outside_forward is True and TensorParallelStrategy.head_outside_forward is True
