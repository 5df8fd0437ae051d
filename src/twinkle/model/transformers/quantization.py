"""Quantized base models for QLoRA: ``TransformersModel(..., quantization_config=BitsAndBytesConfig(...))``.

The base weights are loaded quantized by transformers (bitsandbytes 4-bit NF4 / 8-bit) and frozen;
only adapters train, and a save writes a plain PEFT adapter folder (the quantized base is never
saved). ``peft.prepare_model_for_kbit_training`` readies the model: frozen base, float32 norms and
embeddings, inputs that require gradients (so activation checkpointing still reaches the adapters).
"""
from __future__ import annotations

from typing import Any, Dict

from torch import nn

# Layouts that keep every rank's module whole: quantized weights cannot be sharded by FSDP / DTensor.
_WHOLE_MODULE_STRATEGIES = ('SingleProcessStrategy', 'DDPStrategy', 'AccelerateDDPStrategy')


def _method(config: Any) -> str:
    method = config.get('quant_method') if isinstance(config, dict) else getattr(config, 'quant_method', '')
    return str(getattr(method, 'value', method) or '')


def prepare_load(kwargs: Dict[str, Any], strategy: Any) -> bool:
    """Check a ``quantization_config`` among the loading kwargs and place the quantized model on this
    rank's device; False when there is none."""
    config = kwargs.get('quantization_config')
    if config is None:
        return False
    if 'bitsandbytes' in _method(config):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ImportError(f'quantization_config={type(config).__name__}(...) needs the bitsandbytes package, '
                              f'which is not installed ({exc}); install it with `pip install bitsandbytes` '
                              f'(4-bit QLoRA needs a CUDA GPU with most releases), or drop quantization_config'
                              ) from exc
    if type(strategy).__name__ not in _WHOLE_MODULE_STRATEGIES:
        raise NotImplementedError(f'quantization_config with the {strategy.name!r} strategy: quantized weights '
                                  f'cannot be sharded (FSDP2 / tensor / expert parallelism); train QLoRA in one '
                                  f'process or with data parallelism (dp_size, strategy="accelerate")')
    device = strategy.device
    if device.type == 'cuda':
        # Quantization happens while loading, on the device the weights are placed on.
        kwargs.setdefault('device_map', {'': device.index if device.index is not None else 0})
    return True


def prepare_model(hf_model: nn.Module) -> None:
    from peft import prepare_model_for_kbit_training
    prepare_model_for_kbit_training(hf_model, use_gradient_checkpointing=False)


def is_quantized(hf_model: nn.Module) -> bool:
    return bool(getattr(hf_model, 'is_quantized', False) or getattr(hf_model, 'hf_quantizer', None))


def check_trainable(hf_model: nn.Module, has_adapters: bool) -> None:
    """Full-parameter training of a quantized model is refused: its weights are frozen integers."""
    if not has_adapters and is_quantized(hf_model):
        raise ValueError('this model was loaded with quantization_config: its base weights cannot train. Add an '
                         'adapter first (add_adapter_to_model("default", LoraConfig(...))), i.e. QLoRA')
