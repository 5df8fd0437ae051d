"""Loss windows shared by the torchrun worker (loss_window_worker.py) and the one-process reference.

Twelve samples of uneven lengths; under two ranks, rank 0 takes micro-batches of 2 and 4 samples and
rank 1 of 4 and 2, so the token counts differ per micro-batch and per rank. The reference runs all
twelve as one batch (for 'bnpo', whose normaliser is one micro-batch, as the same four micro-batches).
"""
from __future__ import annotations

import functools
import zlib
from typing import Any, Dict, List, Tuple

import torch

from twinkle import loss as L

MODEL_ID = 'builtin://tiny-qwen3'
RANK_PARTS = [[(0, 2), (2, 6)], [(6, 10), (10, 12)]]
ALL_PARTS = [part for parts in RANK_PARTS for part in parts]
SUM_LOSSES = ('ce_sum', 'grpo_sum', 'ppo', 'cispo', 'importance_sampling')


def samples(n: int = 12, seed: int = 21) -> List[Dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 26, (1,), generator=g))
        ids = torch.randint(3, 4000, (length,), generator=g).tolist()
        cut = int(torch.randint(2, length - 2, (1,), generator=g))
        out.append({'input_ids': ids, 'labels': [-100] * cut + ids[cut:],
                    'advantages': float(torch.randn((), generator=g)),
                    'old_logps': (-8.3 + 0.3 * torch.randn(length, generator=g)).tolist(),
                    'ref_logps': (-8.3 + 0.3 * torch.randn(length, generator=g)).tolist()})
    return out


LOSSES = {
    'ce_mean': lambda: L.CrossEntropyLoss(),
    'ce_sum': lambda: L.CrossEntropyLoss(reduction='sum'),
    'grpo': lambda: L.GRPOLoss(loss_type='grpo', beta=0.04),
    'dapo': lambda: L.GRPOLoss(loss_type='dapo'),
    'dr_grpo': lambda: L.GRPOLoss(loss_type='dr_grpo', max_length=64),
    'bnpo': lambda: L.GRPOLoss(loss_type='bnpo'),
    'grpo_sum': lambda: L.GRPOLoss(loss_type='sum'),
    'gspo': lambda: L.GSPOLoss(),
    'ppo': lambda: L.PPOLoss(),
    'cispo': lambda: L.CISPOLoss(),
    'importance_sampling': lambda: L.ImportanceSamplingLoss(),
    'dpo': lambda: L.DPOLoss(),
    'simpo': lambda: L.SimPOLoss(),
}
LOSS_NAMES = tuple(LOSSES)


def make_loss(name: str) -> Any:
    return LOSSES[name]()


def build(mesh: Any = None, strategy: str = 'native_fsdp') -> Any:
    from twinkle.model import TransformersModel
    from twinkle.runtime import seed_everything
    seed_everything(1234)
    model = TransformersModel(model_id=MODEL_ID, device_mesh=mesh, strategy=strategy, mixed_precision='no',
                              report_to_tensorboard=False)
    model.set_optimizer('AdamW', lr=1e-3)
    return model


def _full(grad: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return grad.full_tensor() if isinstance(grad, DTensor) else grad


@functools.lru_cache(maxsize=None)
def _probe(name: str, shape: Tuple[int, ...]) -> torch.Tensor:
    # The same float64 direction per parameter in every window: drawn once (a few million draws per window
    # otherwise, about a tenth of each rank's run).
    return torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())), dtype=torch.float64)


def window(model: Any, name: str, batches: List[List[Dict[str, Any]]]) -> Dict[str, Any]:
    """Run one accumulation window; return a fingerprint of the whole gradient, the reported losses,
    the window's metrics and the gradient norm (the strategy's and a float64 one of the same grads)."""
    session = model._session(None)
    model.set_loss(make_loss(name))
    model.calculate_metric()  # the report period starts here
    session.gradient_accumulation_steps = len(batches)
    losses = [model.forward_backward(inputs=b)['loss'] for b in batches]
    assert model._normalise_window(session)
    prints, squares = {}, torch.zeros((), dtype=torch.float64)
    for pname, p in model.strategy.unwrap(model._wrapped_module()).named_parameters():
        if p.grad is None:
            continue
        g = _full(p.grad).detach().double().cpu()
        r = _probe(pname, tuple(g.shape))
        prints[pname] = [float((g * r).sum()), float(g.norm())]
        squares += (g ** 2).sum()
    params = [p for group in session.optimizer.param_groups for p in group['params'] if p.grad is not None]
    norm = float(model.strategy.clip_grad_norm(params, 1e12, 2.0))
    metric = model.calculate_metric()
    model.zero_grad()
    return {'prints': prints, 'losses': losses, 'metric': {k: v for k, v in metric.items()
                                                           if isinstance(v, float) and k != 'tokens_per_s'},
            'norm': norm, 'norm64': float(squares.sqrt())}


def slices(data: List[Dict[str, Any]], parts: List[Any]) -> List[List[Dict[str, Any]]]:
    return [data[a:b] for a, b in parts]
