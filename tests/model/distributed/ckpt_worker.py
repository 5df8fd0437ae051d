"""Run under torchrun (2 processes, gloo) by test_checkpointing_fsdp.py: ``ckpt_worker.py OUT_DIR``.

FSDP2 over both ranks, with and without activation checkpointing (full and LoRA): the first backward's
local gradient shards, the per-step losses, and how often each layer's attention ran in one
forward_backward. Writes ``OUT_DIR/rank<r>.json``.
"""
import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _scenarios as S  # noqa: E402

import twinkle  # noqa: E402
from twinkle import DeviceMesh  # noqa: E402
from twinkle.model.transformers.distributed.fsdp2 import decoder_layers  # noqa: E402
from twinkle.runtime import rank as get_rank  # noqa: E402

OUT = Path(sys.argv[1])
FSDP = DeviceMesh.from_sizes(fsdp_size=2)
twinkle.initialize(mode='local', global_device_mesh=FSDP, seed=S.SEED)


def local_grads(model):
    from torch.distributed.tensor import DTensor
    return {n: (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).clone()
            for n, p in model.module.named_parameters() if p.grad is not None}


def run(lora, checkpointing):
    model = S.build(FSDP, lora=lora, gradient_checkpointing=checkpointing)
    calls = [0]
    for layer in decoder_layers(model.hf_model):
        layer.self_attn.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    batches = iter(S.loader(FSDP))
    losses = [model.forward_backward(inputs=next(batches))['loss']]
    grads = local_grads(model)
    attention_calls, layers = calls[0], len(decoder_layers(model.hf_model))
    model.clip_grad_and_step(max_grad_norm=1.0)
    for _ in range(2):
        losses.append(model.forward_backward(inputs=next(batches))['loss'])
        model.clip_grad_and_step(max_grad_norm=1.0)
    model.shutdown()
    return losses, grads, attention_calls, layers


result = {}
for lora in (False, True):
    name = 'lora' if lora else 'full'
    plain_losses, plain_grads, plain_calls, layers = run(lora, False)
    ckpt_losses, ckpt_grads, ckpt_calls, _ = run(lora, True)
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    result[name] = {
        'plain_losses': plain_losses, 'ckpt_losses': ckpt_losses, 'layers': layers,
        'plain_calls': plain_calls, 'ckpt_calls': ckpt_calls, 'num_grads': len(plain_grads),
        'lora_only': all('lora_' in n for n in ckpt_grads),
        'max_grad_diff': max((ckpt_grads[n] - plain_grads[n]).abs().max().item() for n in plain_grads),
        'max_grad': max(g.abs().max().item() for g in plain_grads.values()),
    }
(OUT / f'rank{get_rank()}.json').write_text(json.dumps(result))
twinkle.runtime.shutdown()
gc.freeze()  # exit without the collector's passes over torch and transformers (about a second a rank)
