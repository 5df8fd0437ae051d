"""Activation checkpointing per decoder layer.

Each decoder layer keeps only its inputs during the forward and runs again in the backward to rebuild
what it needs, so activation memory grows with the number of layers times the hidden size instead of
with every intermediate (attention scores, MLP activations).

We use the Hugging Face layers' own switch (``activation_checkpointing_enable``) with
``use_reentrant=False``, rather than wrapping layers in torch's ``checkpoint_wrapper``:

* the checkpoint wraps each layer's ``forward``, not its ``__call__``, so FSDP2's hooks on that layer
  (unshard before the forward, reshard after, unshard again before its backward) run once, outside the
  checkpointed region; the recompute runs inside the layer's backward, after FSDP2 has unsharded its
  parameters. The layer is the same module object before and after ``fully_shard``, and the switch
  is read at call time, so it can be turned on or off before or after wrapping;
* parameter names stay unchanged (``checkpoint_wrapper`` inserts a ``_checkpoint_wrapped_module``
  level), so state dicts, adapters and optimizer state by name are unaffected;
* non-reentrant checkpointing tracks gradients through the recompute itself, so frozen inputs (LoRA:
  the embeddings do not train) still get gradients to the adapters inside the layer; the reentrant
  variant would need the layer's inputs to require grad.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, List, Tuple, cast

from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _contexts() -> Tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    # The recompute runs in the backward, outside the forward's context: state the forward set up around
    # the layers (the context-parallel ring attention) has to be set up again for it.
    from ..forward_seam import recompute_context
    return contextlib.nullcontext(), recompute_context()


CHECKPOINT_KWARGS = {'use_reentrant': False, 'context_fn': _contexts}


def checkpointed_layers(hf_model: nn.Module) -> List[nn.Module]:
    """The decoder layers whose forward is checkpointed now."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    return [m for m in hf_model.modules()
            if isinstance(m, GradientCheckpointingLayer) and getattr(m, 'gradient_checkpointing', False)]


def set_activation_checkpointing(hf_model: nn.Module, enabled: bool) -> None:
    """Turn non-reentrant checkpointing of every decoder layer on or off (the Hugging Face model, not a
    PEFT or FSDP wrapper: the flags live on its layers, which the wrappers share)."""
    if not getattr(hf_model, 'supports_gradient_checkpointing', False):
        raise ValueError(f'gradient_checkpointing=True: {type(hf_model).__name__} does not support activation '
                         f'checkpointing (its layers have no gradient_checkpointing switch); leave it False')
    hf = cast('PreTrainedModel', hf_model)
    if enabled:
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))
        if not checkpointed_layers(hf_model):
            raise ValueError(f'gradient_checkpointing=True: {type(hf_model).__name__} has no decoder layers that '
                             f'can be checkpointed one by one; leave it False')
    else:
        hf.activation_checkpointing_disable()
        # Enabling made the embeddings' output require grad (needed by reentrant checkpointing only);
        # without checkpointing that extra gradient is wasted work.
        hf.disable_input_require_grads()
