"""The router load-balancing loss over the whole global batch, for expert parallelism.

A mixture-of-experts model computes its auxiliary loss from the tokens of its own forward. Under
expert parallelism every rank holds a different slice of the batch, and the loss is not linear in its
statistics (the fraction of tokens per expert times the mean router probability per expert), so each
rank's own figure would differ from one process's. Here the two statistics are summed over the
data-parallel ranks first (the probabilities through a differentiable all-reduce, so that each rank's
router receives the gradient of the global loss), then combined as Hugging Face's
``load_balancing_loss_func`` does, padding excluded.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn


def _routers(hf_model: nn.Module) -> List[nn.Module]:
    # Top-k routers (Qwen3-MoE, Qwen2-MoE, Mixtral): a weight of (experts, hidden), top_k and num_experts.
    return [m for m in hf_model.modules() if hasattr(m, 'top_k') and hasattr(m, 'num_experts')
            and isinstance(getattr(m, 'weight', None), torch.Tensor) and not hasattr(m, 'gate_up_proj')]


class GlobalRouterLoss:
    """Wraps the forward core: records every router's logits, then replaces ``aux_loss`` with the one
    of the global batch."""

    def __init__(self, core: Callable[..., Dict[str, Any]], hf_model: nn.Module, group: Any,
                 comm_device: torch.device) -> None:
        self.core, self.group, self.comm_device = core, group, comm_device
        self.routers = _routers(hf_model)
        self._logits: List[torch.Tensor] = []
        for router in self.routers:
            router.register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        self._logits.append(output[0] if isinstance(output, tuple) else output)

    def __call__(self, module: nn.Module, hf_model: nn.Module, batch: Dict[str, Any], **kwargs: Any) -> Dict[str, Any]:
        self._logits = []
        try:
            outputs = self.core(module, hf_model, batch, **kwargs)
            if isinstance(outputs.get('aux_loss'), torch.Tensor) and self._logits:
                # Top-k routers hold plain ints here (see _routers); nn.Module's typing cannot say so.
                router: Any = self.routers[0]
                outputs['aux_loss'] = self.global_loss(self._logits, batch.get('attention_mask'),
                                                       int(router.num_experts), int(router.top_k))
        finally:
            self._logits = []
        return outputs

    def global_loss(self, logits: List[torch.Tensor], attention_mask: Optional[torch.Tensor], num_experts: int,
                    top_k: int) -> torch.Tensor:
        import torch.distributed.nn.functional as dfn
        rows = logits[0].shape[0]
        mask = attention_mask.reshape(-1).float() if attention_mask is not None and attention_mask.numel() == rows \
            else torch.ones(rows)
        mask = mask.to(logits[0].device)
        counts = torch.zeros(num_experts, device=mask.device)
        probs = torch.zeros(num_experts, device=mask.device)
        for layer in logits:
            weights = torch.softmax(layer.float(), dim=-1)
            _, chosen = torch.topk(weights, top_k, dim=-1)
            counts = counts.scatter_add(0, chosen.reshape(-1), mask.repeat_interleave(top_k))
            probs = probs + (weights * mask[:, None]).sum(dim=0)
        stats = torch.cat([counts, (mask.sum() * len(logits)).reshape(1)]).detach().to(self.comm_device)
        dist.all_reduce(stats, group=self.group)
        stats = stats.to(probs.device)
        probs = dfn.all_reduce(probs.to(self.comm_device), group=self.group).to(probs.device)
        total = stats[-1]
        return torch.sum((stats[:-1] / total) * (probs / total)) * num_experts


def build(strategy: Any, core: Callable[..., Dict[str, Any]], hf_model: nn.Module) -> Optional[GlobalRouterLoss]:
    """The global router loss for an expert-parallel strategy, else None."""
    if getattr(strategy, 'name', None) != 'expert_parallel':
        return None
    return GlobalRouterLoss(core, hf_model, strategy.group, strategy._comm_device)
