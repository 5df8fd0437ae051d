"""An RL (GRPO) variant of the shared training scenario: the same samples with one advantage each."""
from __future__ import annotations

from typing import Any

import torch


def loader(mesh: Any = None) -> Any:
    import _scenarios as S

    from twinkle.dataloader import DataLoader
    g = torch.Generator().manual_seed(7)
    # Off-policy: sampler log-probabilities near the model's, so the importance ratio is not 1.
    samples = [{**s, 'advantages': float(torch.randn((), generator=g)),
                'old_logps': (-8.3 + 0.3 * torch.randn(len(s['input_ids']), generator=g)).tolist()}
               for s in S.make_samples()]
    return DataLoader(samples, batch_size=S.GLOBAL_BATCH, shuffle=True, seed=S.SEED, device_mesh=mesh)


def use_grpo(model: Any) -> None:
    from twinkle import loss as L
    model.set_loss(L.GRPOLoss(loss_type='grpo'))


def use_padding_free(model: Any) -> None:
    """Batches as one row of concatenated samples (position ids restart at every sample)."""
    from twinkle.processor import InputProcessor
    model.set_processor(InputProcessor(pad_token_id=0, padding_free=True))
