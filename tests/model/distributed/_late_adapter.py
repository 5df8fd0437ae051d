"""An adapter added to a model that already trained (so the strategy had wrapped / sharded it), then trained
itself: under every layout it must train as in one process on the global batch. Called by the torchrun workers
after a LoRA run, and here in one process for the reference."""
from __future__ import annotations

import functools
import hashlib
from typing import Any, Dict

import _scenarios as S

STEPS = 3


def late_adapter(model: Any, mesh: Any) -> Dict[str, Any]:
    """Add adapter ``late`` and train it for STEPS steps: the global losses, how its q_proj B is placed (split
    over tp under tensor parallelism) and a digest of this rank's copy of its weights."""
    from peft import LoraConfig
    from torch.distributed.tensor import DTensor

    from twinkle.runtime import seed_everything
    seed_everything(S.SEED)
    model.add_adapter_to_model('late', LoraConfig(r=4, lora_alpha=8, target_modules='all-linear'))
    # The strategy wraps again here, with 'late' inactive (frozen): it must still average it once it trains.
    model.forward_only(inputs=next(iter(S.loader(mesh))), adapter_name='default')
    model.set_optimizer('AdamW', adapter_name='late', lr=2e-2, weight_decay=0.01)
    losses, batches = [], iter(S.loader(mesh))
    for _ in range(STEPS):
        losses.append(model.forward_backward(inputs=next(batches), adapter_name='late')['loss'])
        model.clip_grad_and_step(max_grad_norm=1.0, adapter_name='late')
    lora_b = model.hf_model.model.layers[0].self_attn.q_proj.lora_B['late'].weight
    placed = [type(p).__name__ for p in lora_b.placements] if isinstance(lora_b, DTensor) else None
    digest = hashlib.sha256()
    for value in late_weights(model).values():
        digest.update(value.numpy().tobytes())
    return {'losses': losses, 'q_B': placed, 'digest': digest.hexdigest()}


def late_weights(model: Any) -> Dict[str, Any]:
    """This rank's (local) tensors of adapter ``late``, by parameter name."""
    from torch.distributed.tensor import DTensor
    return {name: (p.to_local() if isinstance(p, DTensor) else p).detach().cpu().contiguous()
            for name, p in model.hf_model.named_parameters() if '.late.' in name}


@functools.lru_cache(maxsize=None)
def alone() -> Dict[str, Any]:
    """The reference: the same in one process (run once per test process; do not modify the result)."""
    model = S.build(None, lora=True)
    try:
        result = late_adapter(model, None)
        result['weights'] = late_weights(model)
    finally:
        model.shutdown()
    return result


def check_ranks_train_as_alone(results: Any) -> None:
    """Every rank's run of ``late_adapter`` (its ``'late'`` entry) holds the same losses and weights, and the
    losses are those of one process on the global batch (to 1e-5 relative)."""
    ranks = [r['late'] for r in results]
    assert all(r['losses'] == ranks[0]['losses'] and r['digest'] == ranks[0]['digest'] for r in ranks)
    for step, (got, want) in enumerate(zip(ranks[0]['losses'], alone()['losses']), 1):
        assert abs(got - want) <= 1e-5 * abs(want), f'step {step}: {got} vs {want}'
