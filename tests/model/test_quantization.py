"""QLoRA: a bitsandbytes-quantized base with a LoRA adapter, saved as a plain PEFT adapter."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from twinkle.model import TransformersModel

from .conftest import MODEL_ID, make_samples

HAS_BNB = importlib.util.find_spec('bitsandbytes') is not None


def _bnb_config():
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_compute_dtype=torch.bfloat16)


@pytest.mark.skipif(HAS_BNB, reason='bitsandbytes is installed: the missing-package error cannot occur')
def test_missing_bitsandbytes_is_a_clear_error():
    with pytest.raises(ImportError, match=r'needs the bitsandbytes package.*pip install bitsandbytes'):
        TransformersModel(model_id=MODEL_ID, mixed_precision='no', quantization_config=_bnb_config())


@pytest.mark.gpu
def test_qlora_trains_and_saves_a_plain_peft_adapter(tmp_path):
    from ..conftest import require
    require('bitsandbytes')
    from peft import LoraConfig, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from twinkle.processor import InputProcessor
    samples = make_samples(8, seed=3)
    torch.manual_seed(0)
    model = TransformersModel(model_id=MODEL_ID, mixed_precision='bf16', quantization_config=_bnb_config(),
                              output_dir=str(tmp_path), report_to_tensorboard=False)
    with pytest.raises(ValueError, match='base weights cannot train'):
        model.set_optimizer('AdamW', lr=1e-3)  # full-parameter training of a quantized model
    model.add_adapter_to_model('default', LoraConfig(r=8, lora_alpha=16, target_modules='all-linear'))
    model.set_processor(InputProcessor(pad_token_id=0))
    model.set_optimizer('AdamW', lr=5e-3)
    losses = []
    for _ in range(6):
        losses.append(model.forward_backward(inputs=samples)['loss'])
        model.clip_grad_and_step(max_grad_norm=1.0)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    folder = model.save('qlora')
    saved = load_file(f'{folder}/adapter_model.safetensors')
    assert saved and all('lora_' in k for k in saved)  # the adapter only, never the quantized base
    # A plain PEFT adapter: it loads onto the unquantized base with PEFT alone.
    from twinkle.hub import resolve
    base = AutoModelForCausalLM.from_pretrained(resolve(MODEL_ID))
    peft_model = PeftModel.from_pretrained(base, folder)
    assert any('lora_A' in n for n, _ in peft_model.named_parameters())
