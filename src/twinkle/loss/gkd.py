"""Knowledge distillation with the generalised Jensen-Shannon divergence (GKD).

For teacher distribution ``T`` and student ``S`` at a position, with ``M = beta T + (1 - beta) S``:
``JSD_beta = beta KL(T || M) + (1 - beta) KL(S || M)``. Small ``beta`` behaves like the forward KL
``KL(T || S)`` (mode covering), ``beta`` near 1 like the reverse KL ``KL(S || T)`` (mode seeking); the
end points themselves are taken as those two KLs, which the mixture form would make zero.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Mapping

import torch

from twinkle.loss.base import Loss, LossOutput
from twinkle.loss.utils import loss_mask
from twinkle.registry import register


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-row divergence [N] between the softmaxes of two [N, V] logit tensors (see the module)."""
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if beta == 1:
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1 - beta)]), dim=0)
    kl_t = (log_t.exp() * (log_t - log_m)).sum(-1)
    kl_s = (log_s.exp() * (log_s - log_m)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


@register('loss', 'gkd')
@register('loss')
class GKDLoss(Loss):
    """Token-level distillation: ``JSD_beta(teacher || student)`` at every scored position.

    The student's logits are ``outputs['logits']``; the teacher's, ``teacher_logits`` [B, T, V], are a
    call keyword or ``inputs['teacher_logits']``, unshifted like the student's. Both are divided by
    ``temperature``. Where the vocabularies differ in size (padded embedding tables), the common leading
    part is compared. reduction='mean': ``num_items`` is the number of scored tokens; 'sum': 1.
    """

    def __init__(self, beta: float = 0.5, temperature: float = 1.0,
                 reduction: Literal['mean', 'sum'] = 'mean') -> None:
        if not 0 <= beta <= 1:
            raise ValueError(f'GKDLoss beta must be in [0, 1]; got {beta}')
        if temperature <= 0:
            raise ValueError(f'GKDLoss temperature must be > 0; got {temperature}')
        if reduction not in ('mean', 'sum'):
            raise ValueError(f"GKDLoss reduction must be 'mean' or 'sum'; got {reduction!r}")
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.reduction = reduction

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> LossOutput:
        student = outputs.get('logits')
        if student is None:
            raise ValueError('GKDLoss needs outputs["logits"] (the student\'s logits [batch, seq, vocab])')
        teacher = kwargs.get('teacher_logits', inputs.get('teacher_logits'))
        if teacher is None:
            raise ValueError('GKDLoss needs teacher_logits [batch, seq, vocab]: pass teacher_logits=... to the '
                             'loss call or put them in inputs["teacher_logits"]')
        labels = inputs.get('labels')
        if labels is None:
            raise ValueError('GKDLoss needs inputs["labels"] ([batch, seq], -100 where no loss is taken)')
        teacher = torch.as_tensor(teacher, device=student.device).detach()
        if teacher.shape[:2] != student.shape[:2] or teacher.dim() != 3:
            raise ValueError(f'GKDLoss: teacher_logits shape {tuple(teacher.shape)} must be [batch, seq, vocab] '
                             f'with the student\'s batch and seq {tuple(student.shape[:2])}')
        vocab = min(student.shape[-1], teacher.shape[-1])
        mask = loss_mask(torch.as_tensor(labels, device=student.device))
        # Position t - 1 predicts labels[:, t]: keep the rows that predict a scored label.
        rows = mask[:, 1:]
        s = student[:, :-1, :vocab][rows]
        t = teacher[:, :-1, :vocab][rows]
        loss = generalized_jsd(s, t, self.beta, self.temperature).sum()
        tokens = rows.sum()
        return LossOutput(loss=loss, num_items=tokens if self.reduction == 'mean' else 1)
