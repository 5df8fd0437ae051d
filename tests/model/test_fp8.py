"""mixed_precision='fp8': torchao float8 linear layers on GPUs with fp8 tensor cores, clear refusals elsewhere."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from twinkle.model import TransformersModel
from twinkle.model.transformers import fp8

from .conftest import MODEL_ID, make_samples

HAS_TORCHAO = importlib.util.find_spec('torchao') is not None
# Relative gap allowed between the fp8 and bf16 losses of the first steps: fp8 (e4m3, 3 mantissa bits)
# rounds each matmul input by up to ~6%, averaging to about 1% on a loss near ln(vocab).
FP8_VS_BF16_REL = 3e-2


def test_fp8_on_cpu_names_the_requirement():
    with pytest.raises(ValueError, match=r'fp8 tensor cores \(compute capability >= 8.9'):
        fp8.check_device(torch.device('cpu'))


@pytest.mark.skipif(HAS_TORCHAO, reason='torchao is installed: the missing-package error cannot occur')
def test_missing_torchao_is_a_clear_error():
    with pytest.raises(ImportError, match=r'torchao.*pip install torchao'):
        fp8.require_torchao()


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.gpu
@pytest.mark.skipif(not _fp8_gpu(), reason='needs a GPU with compute capability >= 8.9 (fp8 tensor cores)')
def test_fp8_first_losses_follow_bf16():
    from ..conftest import require
    require('torchao')
    from twinkle.processor import InputProcessor
    samples = make_samples(8, seed=5)
    runs = {}
    for mode in ('bf16', 'fp8'):
        torch.manual_seed(0)
        model = TransformersModel(model_id=MODEL_ID, mixed_precision=mode, report_to_tensorboard=False)
        model.set_processor(InputProcessor(pad_token_id=0))
        model.set_optimizer('AdamW', lr=1e-3)
        if mode == 'fp8':
            kinds = {type(m).__name__ for m in model.hf_model.modules()}
            assert 'Float8Linear' in kinds, kinds
        runs[mode] = []
        for _ in range(3):
            runs[mode].append(model.forward_backward(inputs=samples)['loss'])
            model.clip_grad_and_step(max_grad_norm=1.0)
        model.shutdown()
    for got, want in zip(runs['fp8'], runs['bf16']):
        assert abs(got - want) <= FP8_VS_BF16_REL * abs(want), runs
