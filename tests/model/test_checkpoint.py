"""Checkpoints: plain formats, atomicity, manifest, resume semantics."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from twinkle.model import TransformersModel
from twinkle.model.checkpoint import MANIFEST, CheckpointError

from .conftest import MODEL_ID, make_samples

LORA = LoraConfig(r=8, lora_alpha=32, target_modules='all-linear')


def _trained(adapter: bool, steps: int = 2, lr: float = 1e-2):
    torch.manual_seed(0)
    model = TransformersModel(model_id=MODEL_ID, mixed_precision='no')
    if adapter:
        model.add_adapter_to_model('default', LORA)
    model.set_optimizer('AdamW', lr=lr)
    model.set_lr_scheduler('CosineWarmupScheduler', num_warmup_steps=1, num_training_steps=10)
    batch = make_samples(4)
    for _ in range(steps):
        model.forward_backward(inputs=batch)
        model.clip_grad_and_step()
    return model, batch


def _logits(module, batch):
    ids = torch.tensor([batch[0]['input_ids']])
    with torch.no_grad():
        return module(input_ids=ids).logits


def test_lora_checkpoint_loads_with_plain_peft(tmp_path, tiny_model_dir):
    model, batch = _trained(adapter=True)
    path = Path(model.save('ckpt', output_dir=str(tmp_path)))
    assert (path / 'adapter_model.safetensors').exists() and (path / 'adapter_config.json').exists()
    assert (path / 'tokenizer.json').exists() and (path / MANIFEST).exists()
    assert not (path / 'trainer_state.json').exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, str(path)).eval()
    model.module.eval()
    torch.testing.assert_close(_logits(plain, batch), _logits(model.module, batch))


def test_full_checkpoint_loads_with_auto_model_and_as_model_id(tmp_path):
    model, batch = _trained(adapter=False)
    path = model.save('full', output_dir=str(tmp_path))
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.module.eval()
    torch.testing.assert_close(_logits(plain, batch), _logits(model.module, batch))
    again = TransformersModel(model_id=path, mixed_precision='no')
    torch.testing.assert_close(_logits(again.module.eval(), batch), _logits(plain, batch))


def test_resume_restores_everything(tmp_path):
    model, batch = _trained(adapter=True, steps=3)
    path = model.save('ckpt', output_dir=str(tmp_path), save_optimizer=True, consumed_train_samples=12)
    state = json.loads((Path(path) / 'trainer_state.json').read_text())
    assert state['cur_step'] == 3 and state['consumed_train_samples'] == 12
    expected_next = None
    for _ in range(2):
        expected_next = model.forward_backward(inputs=batch)['loss']
        model.clip_grad_and_step()

    torch.manual_seed(123)  # a different LoRA init: resume must overwrite it
    fresh = TransformersModel(model_id=MODEL_ID, mixed_precision='no')
    fresh.add_adapter_to_model('default', LORA)
    fresh.set_optimizer('AdamW', lr=1e-2)
    fresh.set_lr_scheduler('CosineWarmupScheduler', num_warmup_steps=1, num_training_steps=10)
    progress = fresh.resume_from_checkpoint(path)
    assert progress == {'cur_step': 3, 'consumed_train_samples': 12, 'gradient_accumulation_steps': 1}
    assert fresh._session(None).scheduler.last_epoch == model._session(None).scheduler.last_epoch - 2
    got = None
    for _ in range(2):
        got = fresh.forward_backward(inputs=batch)['loss']
        fresh.clip_grad_and_step()
    assert got == expected_next


def test_resume_only_model(tmp_path):
    model, batch = _trained(adapter=True)
    path = model.save('ckpt', output_dir=str(tmp_path), save_optimizer=True, consumed_train_samples=8)
    fresh = TransformersModel(model_id=MODEL_ID, mixed_precision='no')
    fresh.add_adapter_to_model('default', LORA)
    progress = fresh.resume_from_checkpoint(path, resume_only_model=True)
    assert progress['consumed_train_samples'] == 8 and progress['cur_step'] == 2
    assert fresh._session(None).optimizer is None
    model.module.eval(), fresh.module.eval()
    torch.testing.assert_close(_logits(fresh.module, batch), _logits(model.module, batch))


def test_incomplete_or_weights_only_folders_are_refused(tmp_path):
    model, _ = _trained(adapter=True, steps=1)
    path = Path(model.save('ckpt', output_dir=str(tmp_path)))
    with pytest.raises(CheckpointError, match='save_optimizer=True'):
        model.resume_from_checkpoint(str(path))
    (path / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match='not a complete Twinkle checkpoint'):
        model.resume_from_checkpoint(str(path))
    with pytest.raises(CheckpointError, match='does not exist'):
        model.resume_from_checkpoint(str(tmp_path / 'nope'))


def test_truncated_file_is_detected(tmp_path):
    model, _ = _trained(adapter=True, steps=1)
    path = Path(model.save('ckpt', output_dir=str(tmp_path), save_optimizer=True))
    weights = path / 'adapter_model.safetensors'
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match='incomplete'):
        model.resume_from_checkpoint(str(path))


def test_save_is_atomic_and_replaces_old_checkpoint(tmp_path):
    model, _ = _trained(adapter=True, steps=1)
    model.save('ckpt', output_dir=str(tmp_path))
    model.save('ckpt', output_dir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']


def test_adapter_added_from_saved_folder(tmp_path):
    model, batch = _trained(adapter=True)
    path = model.save('ckpt', output_dir=str(tmp_path))
    other = TransformersModel(model_id=MODEL_ID, mixed_precision='no')
    other.add_adapter_to_model('loaded', path)
    other.set_optimizer('AdamW', lr=1e-3)
    other.module.eval(), model.module.eval()
    torch.testing.assert_close(_logits(other.module, batch), _logits(model.module, batch))


RESUME_SCRIPT = r'''
import gc, json, sys, torch
from peft import LoraConfig
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.preprocessor import SelfCognitionProcessor
from twinkle.dataloader import DataLoader
from twinkle.model import TransformersModel
import twinkle

phase, ckpt, total = sys.argv[1], sys.argv[2], 6
twinkle.initialize(mode='local', seed=7)
ds = Dataset(dataset_meta=DatasetMeta('builtin://self-cognition', data_slice=range(48)))
ds.set_template('Template', model_id='builtin://tiny-qwen3')
ds.map(SelfCognitionProcessor('twinkle LLM', 'ModelScope community'))
ds.encode()
dl = DataLoader(dataset=ds, batch_size=4, shuffle=True, seed=3)
model = TransformersModel(model_id='builtin://tiny-qwen3', mixed_precision='no')
model.add_adapter_to_model('default', LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1,
                           target_modules='all-linear'), gradient_accumulation_steps=2)
model.set_optimizer('AdamW', lr=1e-3)
model.set_lr_scheduler('CosineWarmupScheduler', num_warmup_steps=2, num_training_steps=total)
start = 0
if phase == 'resume':
    progress = model.resume_from_checkpoint(ckpt)
    dl.resume_from_checkpoint(progress['consumed_train_samples'])
    start = progress['cur_step'] * progress['gradient_accumulation_steps']
losses = []
for i, batch in enumerate(dl, start=start):
    losses.append(model.forward_backward(inputs=batch)['loss'])
    model.clip_grad_and_step()
    if phase == 'first' and i == 5:
        model.save(ckpt, save_optimizer=True, consumed_train_samples=dl.get_state()['consumed_train_samples'])
        break
    if i == 9:
        break
print('LOSSES' + json.dumps(losses))
gc.freeze()  # exit without the collector's passes over torch and transformers (about a second)
'''


def _run(tmp_path, *args):
    script = tmp_path / 'resume_run.py'
    script.write_text(RESUME_SCRIPT)
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith('LOSSES')][-1]
    return json.loads(line[len('LOSSES'):])


def test_exact_resume_in_a_new_process_is_bit_identical(tmp_path):
    """6 micro-steps, save, resume in a new process for 4 more == 10 uninterrupted (dropout on, shuffled)."""
    ckpt = str(tmp_path / 'ckpt')
    full = _run(tmp_path, 'full', ckpt)
    first = _run(tmp_path, 'first', ckpt)
    resumed = _run(tmp_path, 'resume', ckpt)
    assert len(full) == 10 and len(first) == 6 and len(resumed) == 4
    assert first + resumed == full  # exact equality of floats: bit-identical
