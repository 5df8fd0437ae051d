"""The output head of a causal LM as one function: projection followed by every logit transform.

Some families change the logits after the output projection inside ``ForCausalLM.forward``
(Gemma2/3 soft-cap them, Cohere multiplies by ``logit_scale``, Granite divides by
``logits_scaling``). Code that runs the projection itself, chunk by chunk, must apply the same
transforms, or its log-probabilities are those of another model. ``verify_head`` compares against
the model's own forward on a few tokens, so a family whose head does something not listed here is
refused instead of trained on wrong numbers.

``chunked_logps`` runs such a head on chunks of positions under activation checkpointing, so that only
one chunk of logits exists at a time (the forward core's chunked mode, switched on by
``ChunkedCrossEntropyPatch``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...loss.utils import loss_mask
from ...types import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedModel

LogitTransform = Callable[[torch.Tensor], torch.Tensor]


def _config_value(config: Any, name: str) -> Any:
    value = getattr(config, name, None)
    if value is None and hasattr(config, 'get_text_config'):
        value = getattr(config.get_text_config(), name, None)
    return value


def logit_transform(hf_model: nn.Module) -> Optional[LogitTransform]:
    """The transforms ``hf_model``'s forward applies after its output projection, or None."""
    config = getattr(hf_model, 'config', None)
    steps = []
    scale = getattr(hf_model, 'logit_scale', None)  # Cohere: a number stored on the LM module
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1:
        steps.append(lambda x, s=float(scale): x * s)
    scaling = _config_value(config, 'logits_scaling')  # Granite
    if isinstance(scaling, (int, float)) and scaling != 1:
        steps.append(lambda x, s=float(scaling): x / s)
    cap = _config_value(config, 'final_logit_softcapping')  # Gemma2/3
    if cap:
        steps.append(lambda x, c=float(cap): torch.tanh(x / c) * c)
    if not steps:
        return None

    def apply(logits: torch.Tensor) -> torch.Tensor:
        for step in steps:
            logits = step(logits)
        return logits
    return apply


def final_softcap(hf_model: nn.Module) -> Optional[float]:
    """The soft-cap ``hf_model``'s forward applies to its logits (Gemma2/3), or None."""
    cap = _config_value(getattr(hf_model, 'config', None), 'final_logit_softcapping')
    return float(cap) if cap else None


def scales_logits(hf_model: nn.Module) -> bool:
    """Whether ``hf_model``'s forward multiplies or divides its logits after the projection (Cohere, Granite)."""
    scale = getattr(hf_model, 'logit_scale', None)
    scaling = _config_value(getattr(hf_model, 'config', None), 'logits_scaling')
    return (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1) or (
        isinstance(scaling, (int, float)) and scaling != 1)


class LogitHead(nn.Module):
    """``hidden -> logits`` exactly as the model's forward computes them."""

    def __init__(self, lm_head: nn.Module, transform: Optional[LogitTransform]):
        super().__init__()
        self.lm_head = lm_head
        self.transform = transform

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        return self.transform(logits) if self.transform is not None else logits


def verify_head(module: nn.Module, hf_model: PreTrainedModel, *, probe_len: int = 8, tol: float = 1e-4) -> None:
    """Raise if projecting the final hidden states with ``LogitHead`` does not give ``module``'s logits.

    Runs one no-grad forward on ``probe_len`` tokens, capturing the projection's input.
    """
    lm_head = hf_model.get_output_embeddings()
    if lm_head is None:
        raise NotImplementedError(f'{type(hf_model).__name__} has no output embeddings (get_output_embeddings() '
                                  f'is None); the chunked cross-entropy needs a separate output projection')
    if any(p.is_meta for p in hf_model.parameters()):
        return  # not materialised yet (memory-efficient init): the known transforms are applied unchecked
    vocab = int(getattr(lm_head, 'out_features', 0) or lm_head.weight.shape[0])
    device = lm_head.weight.device
    ids = torch.arange(probe_len, device=device).remainder(vocab).unsqueeze(0)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            captured = []
            hook = lm_head.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
            try:
                reference = module(input_ids=ids, use_cache=False).logits.float()
            finally:
                hook.remove()
            hidden = captured[-1]
            mine = LogitHead(lm_head, logit_transform(hf_model))(hidden).float()
    finally:
        module.train(was_training)
    err = float((mine - reference).abs().max()) if mine.shape == reference.shape else float('inf')
    if not err <= tol * max(1.0, float(reference.abs().max())):
        raise NotImplementedError(
            f'{type(hf_model).__name__} transforms its logits after the output projection in a way the chunked '
            f'cross-entropy does not reproduce (max difference {err:.3g}); train it without '
            f'ChunkedCrossEntropyPatch')


def owner_of(root: nn.Module, target: nn.Module) -> tuple:
    """(parent module, attribute name) under which ``target`` is registered in ``root``."""
    for module in root.modules():
        for child_name, child in module.named_children():
            if child is target:
                return module, child_name
    raise RuntimeError('could not locate the output projection to patch')


def _chunk_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()
    safe = torch.where(target == IGNORE_INDEX, torch.zeros_like(target), target)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def chunked_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                  chunk_size: int) -> torch.Tensor:
    """``logps`` [B, T] aligned with ``labels`` from the final hidden states [B, T, H]."""
    batch, seq, width = hidden.shape
    mask = loss_mask(labels)
    pred = hidden[:, :-1].reshape(-1, width)
    target = labels[:, 1:].reshape(-1)
    pieces = []
    for start in range(0, pred.shape[0], chunk_size):
        h, t = pred[start:start + chunk_size], target[start:start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_logps, lm_head, h, t, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(lm_head, h, t))
    shifted = torch.cat(pieces).view(batch, seq - 1) if pieces else hidden.new_zeros((batch, 0))
    logps = torch.cat([shifted.new_zeros((batch, 1)), shifted], dim=1)
    return logps.masked_fill(~mask, 0.0)
