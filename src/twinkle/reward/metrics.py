"""Batch statistics of an RL step: reward and response-length summaries, as plain numbers."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch

Values = Union[Sequence[float], torch.Tensor]


def rl_batch_metrics(rewards: Values, response_lengths: Optional[Values] = None,
                     num_generations: Optional[int] = None) -> Dict[str, float]:
    """reward_mean/std/min/max (population std), response_length_mean/min/max, and with
    ``num_generations`` the fraction of prompt groups whose rewards are all equal (such groups get zero
    GRPO advantage and so contribute no learning signal)."""
    r = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    if r.numel() == 0:
        raise ValueError('rl_batch_metrics got an empty rewards list')
    out = {
        'reward_mean': float(r.mean()),
        'reward_std': float(r.std(correction=0)),
        'reward_min': float(r.min()),
        'reward_max': float(r.max()),
    }
    if response_lengths is not None:
        n = torch.as_tensor(response_lengths, dtype=torch.float64).flatten()
        if n.numel() != r.numel():
            raise ValueError(f'rl_batch_metrics got {r.numel()} rewards but {n.numel()} response lengths')
        out.update(response_length_mean=float(n.mean()), response_length_min=float(n.min()),
                   response_length_max=float(n.max()))
    if num_generations:
        if r.numel() % num_generations:
            raise ValueError(f'rl_batch_metrics: num_generations={num_generations} does not divide the '
                             f'{r.numel()} rewards')
        groups = r.view(-1, num_generations)
        out['frac_groups_zero_std'] = float((groups.max(1).values == groups.min(1).values).double().mean())
    return out
