"""TransformersModel: a thin facade over a Hugging Face causal LM.

It holds the wrapped module and its Strategy (how it is laid out across processes, and its
communication), one forward core, and the backend hooks of ``TrainingCore`` (sessions, metrics, the
accumulation window and the checkpoint flow are the core's). Weights I/O lives in ``io.py``, adapters
in ``adapters.py``, generation in ``generation.py``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import torch
from torch import nn

from ...loss.base import bind_loss_template, reported_loss, window_reduction, window_scale
from ...runtime.remote import remote_class, remote_function
from ..adapter_state import AdapterState
from ..core import TrainingCore
from ..inputs import prepare_batch
from . import adapters, checkpointing, generation, io, quantization, routed
from .context_parallel import seam as context_parallel_seam
from .forward import ForwardCore, training_mode
from .precision import Precision
from .router_loss import add_router_aux_loss
from .sequence_parallel import ulysses as ulysses_seam
from .strategy import scale_, trainable_named_params
from .strategy_factory import build_strategy, expert_parallel_forward

# Constructor options that belong to Twinkle; everything else goes to from_pretrained / from_config.
_OWN_KWARGS = ('output_dir', 'log_dir', 'report_to_tensorboard')


@remote_class
class TransformersModel(TrainingCore):

    def __init__(self,  # noqa: C901 - the signature is the public contract
                 model_cls: Optional[Union[Type[nn.Module], str]] = None,
                 model_id: Optional[str] = None,
                 config: Optional[Any] = None,
                 device_mesh: Optional[Any] = None,
                 mixed_precision: str = 'bf16',
                 strategy: str = 'accelerate',
                 ddp_config: Optional[Dict[str, Any]] = None,
                 fsdp_config: Optional[Dict[str, Any]] = None,
                 grad_scaler_config: Optional[Dict[str, Any]] = None,
                 memory_efficient_init: bool = False,
                 gradient_checkpointing: bool = False,
                 **kwargs: Any):
        own = {k: kwargs.pop(k) for k in _OWN_KWARGS if k in kwargs}
        self.model_id = model_id
        self.strategy = build_strategy(strategy, device_mesh=device_mesh, mixed_precision=mixed_precision,
                                       ddp_config=ddp_config, fsdp_config=fsdp_config,
                                       memory_efficient_init=memory_efficient_init)
        self.comm = self.strategy
        self.device = self.strategy.device
        self.precision = Precision(mixed_precision, self.device, grad_scaler_config,
                                   handled_by_wrapper=self.strategy.handles_mixed_precision)
        quantized = quantization.prepare_load(kwargs, self.strategy)
        self.model_dir, hf_model = io.load_hf_model(model_cls, model_id, config, kwargs, self.strategy)
        if quantized:
            quantization.prepare_model(hf_model)
        self.precision.prepare_module(hf_model)
        self.hf_model: nn.Module = hf_model
        if gradient_checkpointing:  # before any wrapping: FSDP2 then shards layers that already checkpoint
            self.set_gradient_checkpointing(True)
        self.module: nn.Module = hf_model          # becomes the PeftModel once an adapter is added
        self._wrapped: Optional[nn.Module] = None  # the strategy's wrapper, built lazily
        self.forward_core = ForwardCore()
        # None unless the mesh has cp_size or ulysses_size > 1: then it shards the sequence around the forward core
        # (or ep_size > 1: the router loss then covers the global batch).
        self._cp_forward = (context_parallel_seam.build(self.strategy, self.forward_core)
                            or ulysses_seam.build(self.strategy, self.forward_core, hf_model)
                            or expert_parallel_forward(self.strategy, self.forward_core, hf_model))
        self._active_adapter: Optional[str] = None
        self._init_core(own, run_name=(model_id or 'model').split('/')[-1].replace(':', ''))

    # ------------------------------------------------------------------ plumbing
    def _wrapped_module(self) -> nn.Module:
        if self._wrapped is None:
            self._wrapped = self.strategy.wrap(self.module)
        return self._wrapped

    def _use_adapter(self, session: AdapterState) -> None:
        if session.name is not None and session.name != self._active_adapter:
            adapters.activate(self.module, session.name)
            self._active_adapter = session.name

    # ------------------------------------------------------------------ forward / loss / backward
    def _run_forward(self, inputs: Any, session: AdapterState, **kwargs: Any) -> Dict[str, Any]:
        batch = prepare_batch(inputs, self)
        bind_loss_template(session.loss, self._template)
        self._use_adapter(session)
        module = self._wrapped_module()
        with self.precision.autocast():
            core = self._cp_forward or self.forward_core
            outputs = core(module, self.hf_model, batch, temperature=kwargs.get('temperature', 1.0))
        outputs['inputs'] = batch
        return outputs

    def _loss(self, session: AdapterState, outputs: Dict[str, Any], **kwargs: Any) -> Any:
        # The session's loss, plus the router load-balancing loss of MoE models that report one.
        return add_router_aux_loss(session.loss(outputs['inputs'], outputs, **kwargs), outputs, self.hf_model)

    @remote_function(dispatch='slice', collect='flatten')
    def forward(self, *, inputs: Any, adapter_name: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
        session = self._session(adapter_name)
        training_mode(self._wrapped_module())
        return self._run_forward(inputs, session, **kwargs)

    @remote_function(dispatch='slice', collect='flatten')
    def forward_only(self, *, inputs: Any, adapter_name: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
        session = self._session(adapter_name)
        module = self._wrapped_module()
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                outputs = self._run_forward(inputs, session, **kwargs)
                loss_output = self._loss(session, outputs)
        finally:
            module.train(was_training)
        for metric in session.eval_metrics:
            metric.update(outputs['inputs'], outputs, loss_output)
        outputs['loss'] = loss_output
        return outputs

    def calculate_loss(self, outputs: Dict[str, Any], *, adapter_name: Optional[str] = None, **kwargs: Any) -> Any:
        session = self._session(adapter_name)
        return self._loss(session, outputs, **kwargs)

    def backward(self, loss_output: Any, *, adapter_name: Optional[str] = None, **kwargs: Any) -> None:
        session = self._session(adapter_name)
        # Refuse a window mixing reductions before any gradient of it exists.
        window_reduction(session.window_reduction, loss_output)
        self.precision.backward(loss_output.loss, session)
        session.add_to_window(loss_output)

    def _backprop(self, session: AdapterState, inputs: Any, **kwargs: Any) -> Any:
        """Forward, loss and backward of one micro-batch, counted in the training metrics but not yet in
        the window (``session.add_to_window``): a caller may run one call's rows as several of these."""
        loss_kwargs = kwargs.pop('loss_kwargs', {})
        # Gradients are synchronised only on the window's last backward.
        last_in_window = session.window_micro_steps + 1 >= session.gradient_accumulation_steps
        module = self._wrapped_module()
        training_mode(module)
        sync = contextlib.nullcontext() if last_in_window else self.strategy.no_sync(module)
        with sync:
            outputs = self._run_forward(inputs, session, **kwargs)
            loss_output = self._loss(session, outputs, **loss_kwargs)
            # Refuse a window mixing reductions before any gradient of it exists.
            window_reduction(session.window_reduction, loss_output)
            self.precision.backward(loss_output.loss, session)
        for metric in session.metrics:
            metric.update(outputs['inputs'], outputs, loss_output)
        session.tokens_since_report += int(outputs['inputs']['num_tokens'])
        return loss_output

    @remote_function(dispatch='slice', collect='mean')
    def forward_backward(self, *, inputs: Any, adapter_name: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
        session = self._session(adapter_name)
        if session.optimizer is None:
            raise ValueError(f'call set_optimizer(...) for adapter {session.name!r} before forward_backward '
                             f'(the optimizer decides which parameters train)')
        loss_output = self._backprop(session, inputs, **kwargs)
        session.add_to_window(loss_output)
        # The figure of the whole global batch: sums over the data-parallel ranks, then the mean.
        loss_sum, num_items = self.strategy.reduce_sum(torch.stack([
            loss_output.loss.detach().to('cpu', torch.float64),
            torch.as_tensor(loss_output.num_items, dtype=torch.float64).detach().cpu()])).tolist()
        loss_value = reported_loss(getattr(loss_output, 'reduction', 'mean'), loss_sum, num_items)
        return {'loss': loss_value, 'num_items': num_items, **loss_output.metrics}

    # ------------------------------------------------------------------ several adapters in one batch
    def forward_backward_routed(self, parts: List[routed.RoutedPart]) -> List[Any]:
        """One forward and backward in which each part's rows train its own adapter (batched multi-LoRA; each
        part gets exactly what its own forward + backward gives): per part a ``routed.RoutedResult`` or the
        exception its own inputs or loss raised. See ``routed.py``."""
        return routed.forward_backward_routed(self, parts)

    def routable(self, adapter_name: str) -> bool:
        """Whether ``adapter_name`` can take part in ``forward_backward_routed`` (no dropout, no LoRA variant),
        on a model that supports it at all (no fp16 loss scaling, no sequence splitting)."""
        return routed.supported(self) and routed.routable(self, adapter_name)

    # ------------------------------------------------------------------ optimisation
    def _trainable(self, session: AdapterState) -> List[torch.Tensor]:
        optimizer = _optimizer(session, 'clipping or scaling gradients')
        return [p for group in optimizer.param_groups for p in group['params']]

    def clip_grad_norm(self, max_grad_norm: float = 1.0, norm_type: float = 2.0, *,
                       adapter_name: Optional[str] = None) -> float:
        session = self._session(adapter_name)
        return self._clip(session, max_grad_norm, norm_type)

    def _clip(self, session: AdapterState, max_grad_norm: float, norm_type: float, scale: float = 1.0) -> float:
        """Clip (after multiplying the gradients by ``scale``, in the same pass); the norm, recorded."""
        self.precision.unscale(session)  # fp16: measure and clip the true gradients, not the scaled ones
        params = [p for p in self._trainable(session) if p.grad is not None]
        norm = self.strategy.clip_grad_norm(params, max_grad_norm, norm_type, scale=scale)
        session.last_grad_norm = float(norm)
        return session.last_grad_norm

    def _window_factor(self, session: AdapterState) -> Optional[float]:
        """What turns the accumulated gradients into those of the window's objective (see twinkle.loss.base):
        1 / the window's units over all ranks for 'mean' losses, the global sum for 'sum' ones; None if a
        'mean' window had no units. Unscales fp16 gradients first."""
        total = float(self.strategy.reduce_sum(session.window_items.clone()))
        scale = window_scale(session.window_reduction, total)
        if scale is None:
            return None
        self.precision.unscale(session)
        # The wrapper averaged over the data-parallel ranks; multiplying back by their number gives the sum.
        return self.strategy.grad_reduce_world * scale

    def _normalise_window(self, session: AdapterState) -> bool:
        factor = self._window_factor(session)
        if factor is None:
            return False
        grads = [p.grad for p in self._trainable(session) if p.grad is not None]
        if grads and factor != 1.0:
            scale_(grads, factor)
        return True

    def _finish_window(self, session: AdapterState, max_grad_norm: float,
                       norm_type: float) -> Tuple[bool, Optional[float]]:
        factor = self._window_factor(session)
        if factor is None:
            return False, None
        grad_norm = None
        if max_grad_norm and max_grad_norm > 0:
            # The window's factor rides on the clipping multiply: one pass over the gradients, not two.
            grad_norm = self._clip(session, max_grad_norm, norm_type, scale=factor)
        else:
            grads = [p.grad for p in self._trainable(session) if p.grad is not None]
            if grads and factor != 1.0:
                scale_(grads, factor)
        self.step(adapter_name=session.name)
        return True, grad_norm

    def step(self, *, adapter_name: Optional[str] = None) -> None:
        """Apply the optimizer to the gradients as they are. Losses are sums, so a hand-written loop that
        calls backward/step itself trains on summed gradients; clip_grad_and_step first turns them into
        the window's objective (divided by its units for 'mean' losses)."""
        session = self._session(adapter_name)
        self.precision.step(session)
        session.optimizer_step += 1

    def zero_grad(self, *, adapter_name: Optional[str] = None) -> None:
        session = self._session(adapter_name)
        _optimizer(session, 'zero_grad').zero_grad(set_to_none=True)
        session.start_window()

    def lr_step(self, *, adapter_name: Optional[str] = None) -> None:
        session = self._session(adapter_name)
        if session.scheduler is not None:
            session.scheduler.step()

    @remote_function(dispatch='all', collect='first')
    def set_optimizer(self, optimizer_cls: Any = 'AdamW', *, adapter_name: Optional[str] = None,
                      **kwargs: Any) -> None:
        from ...optim import build_optimizer
        quantization.check_trainable(self.hf_model, bool(self.adapter_names))
        session = self._session(adapter_name)
        self._use_adapter(session)  # PEFT marks only the active adapter trainable
        module = self._wrapped_module()
        named = list(trainable_named_params(self.strategy.unwrap(module), session.name))
        session.optimizer = build_optimizer(optimizer_cls, named, **kwargs)
        session.optimizer_kwargs = {'optimizer_cls': getattr(optimizer_cls, '__name__', optimizer_cls), **kwargs}
        session.scaler = self.precision.make_scaler()
        session.start_window()

    @remote_function(dispatch='all', collect='first')
    def set_lr_scheduler(self, scheduler_cls: Any = 'CosineWarmupScheduler', *,
                         adapter_name: Optional[str] = None, **kwargs: Any) -> None:
        from ...optim import build_scheduler
        session = self._session(adapter_name)
        if session.optimizer is None:
            raise ValueError('set_optimizer(...) must come before set_lr_scheduler(...)')
        session.scheduler = build_scheduler(scheduler_cls, session.optimizer, **kwargs)

    # ------------------------------------------------------------------ components
    @remote_function(dispatch='all', collect='first')
    def add_adapter_to_model(self, adapter_name: str, config_or_dir: Any, *,
                             gradient_accumulation_steps: int = 1, **kwargs: Any) -> None:
        if self._wrapped is not None and self._wrapped is not self.module:
            raise RuntimeError('adapters must be added before the model is wrapped for distributed training '
                               '(before the first set_optimizer / forward)')
        if adapter_name in self.sessions:
            raise ValueError(f'adapter {adapter_name!r} already exists')
        if None in self.sessions:
            raise ValueError('this model is already set up for full-parameter training; add adapters before '
                             'calling set_optimizer')
        self.module = adapters.add(self.module, self.hf_model, adapter_name, config_or_dir, **kwargs)
        if self._wrapped is not None:
            self._wrapped = None
        self._active_adapter = None
        self._new_adapter_session(adapter_name, gradient_accumulation_steps)

    def remove_adapter(self, adapter_name: str) -> None:
        session = self._session(adapter_name)
        others = [n for n in self.adapter_names if n != session.name]
        if others:  # PEFT keeps pointing at a deleted active adapter; move it to a surviving one first
            adapters.activate(self.module, others[0])
        adapters.remove(self.module, adapter_name)
        self.sessions.pop(session.name)
        self._active_adapter = None

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each decoder layer's activations in the backward instead of keeping them
        (non-reentrant, per layer); may be switched at any time, also after wrapping."""
        checkpointing.set_activation_checkpointing(self.hf_model, bool(enabled))

    # ------------------------------------------------------------------ checkpoint hooks
    def _gather_weights(self, session: AdapterState) -> Optional[Dict[str, Any]]:
        return io.weights_of(self.strategy, self.module, session.name)

    def _write_weights(self, folder: Path, session: AdapterState, weights: Dict[str, Any]) -> None:
        io.write_weights(folder, weights, module=self.module, hf_model=self.strategy.unwrap(self.hf_model),
                         adapter_name=session.name)
        if self._template is not None or self.model_dir is not None:
            self.tokenizer.save_pretrained(str(folder))

    def _load_weights(self, folder: Path, session: AdapterState) -> None:
        io.load_weights(folder, self.strategy, self.module, session.name)

    def _save_optimizer_state(self, folder: Path, session: AdapterState) -> None:
        self.strategy.save_optimizer_state(folder, self._wrapped_module(), _optimizer(session, 'saving its state'))

    def _load_optimizer_state(self, folder: Path, session: AdapterState) -> None:
        self.strategy.load_optimizer_state(folder, self._wrapped_module(), _optimizer(session, 'loading its state'))

    def _trainer_state_extra(self) -> Dict[str, Any]:
        return {'world_size': self.strategy.grad_reduce_world, 'strategy': self.strategy.name}

    def get_state_dict(self, *, adapter_name: Optional[str] = None) -> Dict[str, Any]:
        return io.weights_of(self.strategy, self.module, self._session(adapter_name).name)

    def get_train_configs(self, *, adapter_name: Optional[str] = None) -> Dict[str, Any]:
        session = self._session(adapter_name)
        return {
            'model_id': self.model_id, 'adapter_name': session.name, 'strategy': self.strategy.name,
            'mixed_precision': self.precision.mode, 'gradient_accumulation_steps': session.gradient_accumulation_steps,
            'optimizer': session.optimizer_kwargs,
            'scheduler': type(session.scheduler).__name__ if session.scheduler is not None else None,
            'loss': type(session.loss).__name__,
            'adapter_config': adapters.config_dict(self.module, session.name),
            **session.progress(),
        }

    # ------------------------------------------------------------------ inference
    @remote_function(dispatch='all', collect='first')
    def generate(self, inputs: Any, generation_config: Any = None, *, adapter_name: Optional[str] = None,
                 **kwargs: Any) -> List[Dict[str, Any]]:
        session = self._session(adapter_name)
        self._use_adapter(session)
        return generation.generate(self, inputs, generation_config, **kwargs)

    def shutdown(self) -> None:
        self._writer.close()
        self._wrapped = None
        self.strategy.shutdown()

    def __repr__(self) -> str:
        return (f'TransformersModel(model_id={self.model_id!r}, strategy={self.strategy.name!r}, '
                f'precision={self.precision.mode!r}, adapters={self.adapter_names})')


def _optimizer(session: AdapterState, action: str) -> torch.optim.Optimizer:
    """The session's optimizer, or a clear error when ``set_optimizer`` has not been called yet."""
    if session.optimizer is None:
        raise ValueError(f'call set_optimizer(...) for adapter {session.name!r} before {action}')
    return session.optimizer
