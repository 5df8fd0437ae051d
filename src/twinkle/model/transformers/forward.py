"""The one forward path every training and evaluation call goes through."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Tuple, cast

import torch
from torch import nn

from ...loss.utils import loss_mask, token_logprobs
from . import packed
from .logit_head import LogitHead, chunked_logps, final_softcap, logit_transform, owner_of

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MODEL_INPUT_KEYS = ('input_ids', 'attention_mask', 'position_ids')


class _Capture(nn.Module):
    """Stands in for the output projection and keeps its input: the final hidden states, before the
    model's forward soft-caps or scales what it takes for the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: Optional[torch.Tensor] = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        return hidden


class ForwardCore:
    """Runs the (wrapped) module and adds ``logps`` aligned with ``labels``.

    ``logits_mode`` is ``('full', None)`` (logits materialised), ``('chunked', chunk_size)`` or
    ``('hidden', None)`` (no logits nor logps: the final hidden states and the output projection are
    handed to a loss that fuses the two, ``outputs['hidden_states']`` / ``outputs['lm_head']``); a patch
    sets it on this instance only.
    """

    def __init__(self) -> None:
        self.logits_mode: Tuple[str, Optional[int]] = ('full', None)

    def __call__(self, module: nn.Module, hf_model: nn.Module, batch: Mapping[str, Any],
                 temperature: float = 1.0) -> Dict[str, Any]:
        model_inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if batch.get(k) is not None}
        labels = batch.get('labels')
        # Rows holding several sequences: lay them out so that no sequence attends to another.
        # (Not for the pieces of a sequence split over ranks: their forward lays the sequences out itself.)
        layout = None if batch.get('sequence_split') else packed.plan(hf_model, model_inputs)
        if layout is not None:
            model_inputs = layout.inputs
        restore = layout.restore if layout is not None else _same
        mode, chunk = self.logits_mode
        if mode in ('chunked', 'hidden') and labels is not None:
            if temperature != 1.0:
                raise ValueError(f'temperature={temperature} is not supported while a {mode} output head is patched '
                                 f'in; revert the patch for temperature-scaled log-probabilities')
            if mode == 'hidden':
                return self._hidden(module, hf_model, model_inputs, labels, restore)
            return self._chunked(module, hf_model, model_inputs, labels, chunk or 1024, restore)
        out = module(**model_inputs, use_cache=False)
        logits = restore(out.logits)
        result: Dict[str, Any] = {'logits': logits}
        _keep_aux_loss(out, result)
        if labels is not None:
            result['logps'], result['mask'] = token_logprobs(logits, labels, temperature=temperature)
        return result

    @staticmethod
    def _without_head(module: nn.Module, hf_model: nn.Module, model_inputs: Dict[str, Any]) -> Tuple[Any, Any, Any]:
        """(model output, final hidden states, output projection) of a forward that skips the projection."""
        # The wrapper (DDP) must still see the call, so the output projection is swapped for a
        # pass-through for the duration of this forward.
        lm_head = cast('PreTrainedModel', hf_model).get_output_embeddings()
        owner, attr = owner_of(hf_model, lm_head)
        capture = _Capture()
        setattr(owner, attr, capture)
        try:
            out = module(**model_inputs, use_cache=False)
        finally:
            setattr(owner, attr, lm_head)
        return out, capture.hidden, lm_head

    @classmethod
    def _hidden(cls, module: nn.Module, hf_model: nn.Module, model_inputs: Dict[str, Any], labels: torch.Tensor,
                restore: Callable[[torch.Tensor], torch.Tensor]) -> Dict[str, Any]:
        out, hidden, lm_head = cls._without_head(module, hf_model, model_inputs)
        result = {'logits': None, 'logps': None, 'mask': loss_mask(labels), 'hidden_states': restore(hidden),
                  'lm_head': lm_head, 'logit_softcap': final_softcap(hf_model)}
        _keep_aux_loss(out, result)
        return result

    @classmethod
    def _chunked(cls, module: nn.Module, hf_model: nn.Module, model_inputs: Dict[str, Any], labels: torch.Tensor,
                 chunk: int, restore: Callable[[torch.Tensor], torch.Tensor]) -> Dict[str, Any]:
        out, hidden, lm_head = cls._without_head(module, hf_model, model_inputs)
        hidden = restore(hidden)
        # Applied chunk by chunk; the model's own forward would also soft-cap / scale the projected
        # logits: do the same.
        logps = chunked_logps(LogitHead(lm_head, logit_transform(hf_model)), hidden, labels, chunk)
        result = {'logits': None, 'logps': logps, 'mask': loss_mask(labels)}
        _keep_aux_loss(out, result)
        return result


def _same(values: torch.Tensor) -> torch.Tensor:
    return values


def _keep_aux_loss(out: Any, result: Dict[str, Any]) -> None:
    # MoE models with output_router_logits return their router load-balancing loss.
    aux = getattr(out, 'aux_loss', None)
    if isinstance(aux, torch.Tensor):
        result['aux_loss'] = aux


def training_mode(module: nn.Module) -> None:
    """Put ``module`` in training mode. ``Module.train()`` sets the flag of every submodule anew (a few
    milliseconds per step for a few hundred modules), so it runs only when some flag is off."""
    if not all(m.training for m in module.modules()):
        module.train()
