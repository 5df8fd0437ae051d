"""Numerical isolation: two tenants training at the same time get exactly what each gets alone."""
from __future__ import annotations

import threading

import torch

from twinkle.client import LoraConfig, TransformersModel, TwinkleClient

from .conftest import KEY_A, KEY_B, MODEL


def tenant_run(url: str, key: str, data_seed: int, steps: int = 4):
    """Losses of a short training run; dropout makes it depend on the adapter's own random stream."""
    with TwinkleClient(url, key) as client:
        model = TransformersModel(model_id=MODEL, client=client)
        model.add_adapter_to_model('default', LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2,
                                                         target_modules=['q_proj', 'v_proj']), seed=data_seed)
        model.set_optimizer('AdamW', lr=1e-2)
        g = torch.Generator().manual_seed(data_seed)
        losses = []
        for _ in range(steps):
            batch = [{'input_ids': torch.randint(3, 4000, (12,), generator=g).tolist()} for _ in range(3)]
            for sample in batch:
                sample['labels'] = sample['input_ids']
            losses.append(model.forward_backward(inputs=batch)['loss'])
            model.clip_grad_and_step()
        evaluation = model.forward_only(inputs=batch)['loss']
        model.release()
        return losses + [evaluation]


def base_fingerprint(server) -> torch.Tensor:
    model = server.ctx.engine.model.hf_model
    return torch.stack([p.detach().double().sum() for n, p in model.named_parameters() if 'lora_' not in n])


def test_concurrent_tenants_match_their_solo_runs_and_leave_the_base_untouched(server):
    before = base_fingerprint(server)
    alone = {KEY_A: tenant_run(server.url, KEY_A, 1), KEY_B: tenant_run(server.url, KEY_B, 2)}
    together = {}
    threads = [threading.Thread(target=lambda k=k, s=s: together.__setitem__(k, tenant_run(server.url, k, s)))
               for k, s in ((KEY_A, 1), (KEY_B, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert together[KEY_A] == alone[KEY_A]   # exact: same bits, whatever the interleaving
    assert together[KEY_B] == alone[KEY_B]
    assert alone[KEY_A] != alone[KEY_B]
    assert torch.equal(base_fingerprint(server), before)
