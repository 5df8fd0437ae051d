"""Cross entropy fused with the output projection (liger-kernel), so the logits [B, T, V] never exist.

The model must hand over its final hidden states and output projection instead of logits: apply
``FusedLinearCrossEntropyPatch`` (``model.apply_patch('FusedLinearCrossEntropyPatch')``), which puts
``outputs['hidden_states']`` [B, T, H] and ``outputs['lm_head']`` in the forward's outputs. Liger's
``LigerFusedLinearCrossEntropyLoss`` then projects and scores chunks of positions inside one kernel.
Without the patch (e.g. an evaluation forward that materialised the logits) the loss is
``CrossEntropyLoss`` on those logits: the same value, without the memory saving.

Labels are aligned with the inputs (``labels[:, t]`` is scored from position ``t - 1``), so the hidden
states are shifted here, exactly as ``CrossEntropyLoss`` shifts the logits. Liger needs a CUDA device
(its kernels are Triton); constructing the loss without liger-kernel or without CUDA raises.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping, NamedTuple, Optional

import torch

from twinkle.loss.base import Loss, LossOutput
from twinkle.loss.cross_entropy import CrossEntropyLoss
from twinkle.loss.utils import loss_mask
from twinkle.registry import register
from twinkle.types import IGNORE_INDEX


class FusedInputs(NamedTuple):
    """What the fused kernel receives: ``weight`` [V, H] (and ``bias``), ``hidden`` [N, H] and ``target``
    [N] (-100 where nothing is scored), plus ``num_tokens``, the number of scored targets."""
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    hidden: torch.Tensor
    target: torch.Tensor
    num_tokens: torch.Tensor


def fused_inputs(inputs: Mapping[str, Any], outputs: Mapping[str, Any], owner: str = 'loss') -> FusedInputs:
    """Rows ``hidden[:, t - 1]`` paired with ``labels[:, t]``, flattened, for a fused linear cross entropy."""
    hidden, head = outputs.get('hidden_states'), outputs.get('lm_head')
    labels = inputs.get('labels')
    if hidden is None or head is None or labels is None:
        raise ValueError(f'{owner} needs outputs["hidden_states"], outputs["lm_head"] (apply '
                         f'FusedLinearCrossEntropyPatch to the model) and inputs["labels"]')
    labels = torch.as_tensor(labels, device=hidden.device)
    if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
        raise ValueError(f'{owner}: hidden_states {tuple(hidden.shape)} must be [batch, seq, hidden] matching '
                         f'labels {tuple(labels.shape)}')
    mask = loss_mask(labels)[:, 1:]
    target = torch.where(mask, labels[:, 1:], torch.full_like(labels[:, 1:], IGNORE_INDEX)).reshape(-1)
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return FusedInputs(head.weight, getattr(head, 'bias', None), rows, target.long(), mask.sum())


def _liger_module() -> Any:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss as Kernel
    except ImportError as exc:
        raise ImportError('LigerFusedLinearCrossEntropyLoss needs liger-kernel (pip install liger-kernel) and a '
                          'CUDA device; on CPU use CrossEntropyLoss, with ChunkedCrossEntropyPatch to bound the '
                          f'logits memory ({exc})') from None
    if not torch.cuda.is_available():
        raise RuntimeError('LigerFusedLinearCrossEntropyLoss needs a CUDA device (liger-kernel runs Triton '
                           'kernels); on CPU use CrossEntropyLoss, with ChunkedCrossEntropyPatch to bound the '
                           'logits memory')
    return Kernel


@register('loss', 'liger_fused_linear_cross_entropy')
@register('loss')
class LigerFusedLinearCrossEntropyLoss(Loss):
    """``-sum(logps)`` over the scored tokens, computed by liger-kernel's fused projection + cross entropy.

    reduction='mean' (default): ``num_items`` is the number of scored tokens; 'sum': 1 per micro-batch
    (see :class:`CrossEntropyLoss`). ``ignore_index``: a label value taking no loss besides -100.
    ``label_smoothing`` is passed to the kernel (0 reproduces ``CrossEntropyLoss``). A model whose head
    soft-caps its logits (Gemma2) has its cap applied by the kernel; ``softcap`` sets another one.
    """

    def __init__(self, reduction: Literal['mean', 'sum'] = 'mean', ignore_index: int = IGNORE_INDEX,
                 label_smoothing: float = 0.0, softcap: Optional[float] = None) -> None:
        if softcap is not None and not float(softcap) > 0:
            raise ValueError(f'LigerFusedLinearCrossEntropyLoss softcap must be positive or None; got {softcap!r}')
        if reduction not in ('mean', 'sum'):
            raise ValueError(f"LigerFusedLinearCrossEntropyLoss reduction must be 'mean' or 'sum'; got {reduction!r}")
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f'LigerFusedLinearCrossEntropyLoss label_smoothing must be in [0, 1]; got '
                             f'{label_smoothing!r}')
        self._kernel_cls = _liger_module()
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        self.softcap = None if softcap is None else float(softcap)
        self._kernels: dict = {}

    def _kernel(self, softcap: Optional[float]) -> Any:
        if softcap not in self._kernels:
            # Always a sum: the units (and the division) are the model's, as for every twinkle loss.
            self._kernels[softcap] = self._kernel_cls(ignore_index=IGNORE_INDEX, reduction='sum',
                                                      label_smoothing=self.label_smoothing, softcap=softcap)
        return self._kernels[softcap]

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> LossOutput:
        inputs = CrossEntropyLoss(ignore_index=self.ignore_index)._with_ignored_as_default(inputs)
        if outputs.get('hidden_states') is None:
            if self.label_smoothing:
                raise ValueError('LigerFusedLinearCrossEntropyLoss(label_smoothing=...) needs the fused path: '
                                 'apply FusedLinearCrossEntropyPatch to the model')
            return CrossEntropyLoss(reduction=self.reduction)(inputs, outputs, **kwargs)
        fused = fused_inputs(inputs, outputs, type(self).__name__)
        softcap = self.softcap if self.softcap is not None else outputs.get('logit_softcap')
        loss = self._kernel(softcap)(fused.weight, fused.hidden, fused.target, fused.bias)
        num_items: Any = fused.num_tokens if self.reduction == 'mean' else 1
        return LossOutput(loss=loss.float(), num_items=num_items, reduction=self.reduction)
