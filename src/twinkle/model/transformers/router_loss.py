"""The router load-balancing loss of mixture-of-experts models, added to the training loss.

Models such as Qwen3-MoE and Mixtral compute it in their forward when ``output_router_logits`` is
set (``outputs.aux_loss``) and add ``router_aux_loss_coef * aux_loss`` to their own mean loss. Twinkle's
losses are sums over units (``LossOutput.num_items``) that the accumulation window divides by the
units, so the term is added as ``coef * aux_loss * num_items``: one micro-batch trains on
``mean loss + coef * aux_loss`` as the model's own forward would, and a window weights each micro-batch's
auxiliary loss by its units, like its main loss. ``aux_loss`` is reported as a metric of its own.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ...loss.base import LossOutput


def router_coef(hf_model: nn.Module) -> float:
    config: Any = hf_model.config  # a Hugging Face config; its fields vary by model
    coef = getattr(config, 'router_aux_loss_coef', None)
    if coef is None and hasattr(config, 'get_text_config'):
        coef = getattr(config.get_text_config(), 'router_aux_loss_coef', None)
    if coef is None:
        raise ValueError(f'{type(hf_model).__name__} returned a router aux_loss but its config has no '
                         f'router_aux_loss_coef; set config.router_aux_loss_coef (0 leaves it out of the loss)')
    return float(coef)


def add_router_aux_loss(loss_output: LossOutput, outputs: Mapping[str, Any], hf_model: nn.Module) -> LossOutput:
    """``loss_output`` with ``coef * aux_loss * num_items`` added, and ``aux_loss`` among its metrics."""
    aux = outputs.get('aux_loss')
    if not isinstance(aux, torch.Tensor):
        return loss_output
    coef = router_coef(hf_model)
    units = torch.as_tensor(loss_output.num_items, dtype=loss_output.loss.dtype, device=loss_output.loss.device)
    loss_output.loss = loss_output.loss + coef * aux.to(loss_output.loss) * units.detach()
    loss_output.metrics = {**(loss_output.metrics or {}), 'aux_loss': float(aux.detach())}
    return loss_output
