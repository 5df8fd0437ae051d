"""MegatronModel: the TwinkleModel training API on a megatron-core GPT model.

The facade holds this rank's ``GPTModel`` shard (built from a Hugging Face config and filled from its
safetensors by ``bridge`` / ``shard``), the megatron-core wrappers (``Float16Module`` for bf16/fp16,
``DistributedDataParallel``) built at ``set_optimizer``, and the backend hooks of ``TrainingCore`` with
one session (full training or one LoRA adapter). Losses are sums over tokens (``twinkle.loss``);
gradients of a whole accumulation window are divided by the window's token count over all
data-parallel ranks at the step, as in TransformersModel.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ...loss.base import LossOutput, bind_loss_template, combine_metrics, reported_loss, window_reduction, window_scale
from ...runtime import context
from ...runtime.remote import remote_class, remote_function
from ..adapter_state import AdapterState
from ..core import TrainingCore
from ..inputs import prepare_batch
from . import io as mio, lora, optim, parallel, step
from ._compat import require_megatron
from .builder import build_gpt, load_hf_weights
from .config import build_transformer_config, hf_to_spec

_OWN_KWARGS = ('output_dir', 'log_dir', 'report_to_tensorboard', 'seed')
PRECISIONS = ('no', 'fp16', 'bf16')


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("MegatronModel runs megatron-core's CUDA kernels and needs a GPU; on CPU use "
                           "TransformersModel (same API)")


@remote_class
class MegatronModel(TrainingCore):

    def __init__(self, model_id: str, config: Optional[Any] = None, device_mesh: Optional[Any] = None,
                 mixed_precision: str = 'bf16', **kwargs: Any):
        require_megatron()
        if mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision={mixed_precision!r}: use one of {', '.join(PRECISIONS)}")
        own = {k: kwargs.pop(k) for k in _OWN_KWARGS if k in kwargs}
        if 'vpp_size' in kwargs:
            parallel.parallel_kwargs(device_mesh or context.get_device_mesh() or _default_mesh(),
                                     vpp_size=kwargs.pop('vpp_size'))
        from transformers import AutoConfig

        from ...hub import resolve as hub_resolve

        self.model_id = model_id
        self.mesh = device_mesh or context.get_device_mesh() or _default_mesh()
        self.device = context.device()
        require_cuda()
        parallel.initialize(self.mesh, seed=int(own.get('seed', context.state().seed or 42)),
                            device_type=self.device.type)
        self.coords = parallel.coords()
        self.comm = parallel.MegatronCommunication(self.device)
        self.model_dir = hub_resolve(model_id)
        self.hf_config = config if config is not None else AutoConfig.from_pretrained(self.model_dir)
        self.spec = hf_to_spec(self.hf_config, tp_size=self.mesh.tp_size)
        self.precision = mixed_precision
        self.tf_config = build_transformer_config(self.spec, parallel.config_kwargs(self.mesh), mixed_precision,
                                                  kwargs, use_cpu_initialization=self.device.type == 'cpu')
        # Some modules (torch norms) allocate on the CPU whatever megatron-core's init device is.
        self.gpt = build_gpt(self.spec, self.tf_config).to(self.device)
        load_hf_weights(self.gpt, self.model_dir, self.spec, self.tf_config, self.coords)
        # megatron-core's DistributedDataParallel (built at set_optimizer); its buffer methods are not nn.Module's.
        self.ddp: Optional[Any] = None
        self.lora_spec: Optional[lora.LoraSpec] = None
        self._init_core(own, run_name='megatron')

    # ------------------------------------------------------------------ plumbing
    @property
    def is_last_stage(self) -> bool:
        return self.coords['pp'] == self.mesh.pp_size - 1

    @property
    def _holds_outputs(self) -> bool:
        return self.is_last_stage

    def _share_metrics(self, metrics: Optional[Dict[str, float]]) -> Dict[str, float]:
        return step.broadcast_from_last_stage(metrics)

    @property
    def module(self) -> torch.nn.Module:
        return self.ddp if self.ddp is not None else self.gpt

    @property
    def shard(self) -> mio.Shard:
        return mio.Shard(self.gpt, self.spec, self.tf_config, self.coords)

    # ------------------------------------------------------------------ forward / backward
    def _batch(self, inputs: Any) -> Dict[str, Any]:
        batch = prepare_batch(inputs, self)
        step.check_positions(batch)
        multiple = self.mesh.tp_size if self.tf_config.sequence_parallel else 1
        pad_id = getattr(self.hf_config, 'pad_token_id', None) or 0
        return step.pad_to_multiple(batch, multiple, pad_id)

    def _run(self, inputs: Any, session: AdapterState, forward_only: bool, kwargs: Dict[str, Any]) -> List[Any]:
        if self.mesh.cp_size > 1:
            raise NotImplementedError('cp_size > 1: megatron-core runs context parallelism only inside Transformer '
                                      'Engine attention (TEDotProductAttention; its local DotProductAttention asserts '
                                      'context_parallel_size == 1), and MegatronModel builds layers from the local, '
                                      'Transformer-Engine-free spec. Use sequence_parallel=True with tp_size > 1, or '
                                      'TransformersModel with cp_size / ulysses_size for long sequences')
        loss_kwargs = kwargs.pop('loss_kwargs', {})
        microbatches = int(kwargs.pop('num_microbatches', 1))
        temperature = kwargs.pop('temperature', 1.0)
        batch = self._batch(inputs)
        bind_loss_template(session.loss, self._template)
        module = self.module
        module.train(not forward_only)

        def loss_fn(mb: Dict[str, Any], outputs: Dict[str, Any]) -> Any:
            return session.loss(mb, outputs, **loss_kwargs)

        ctx = torch.no_grad() if forward_only else torch.enable_grad()
        with ctx:
            return step.run_schedule(module, step.split_microbatches(batch, microbatches), self.spec.vocab_size,
                                     loss_fn, forward_only, temperature)

    def _summarise(self, collected: List[Any], session: AdapterState, training: bool) -> Dict[str, Any]:
        result = None
        if self.is_last_stage:
            loss_sum = sum(float(lo.loss.detach()) for _, _, lo in collected)
            items = sum(float(lo.num_items) for _, _, lo in collected)
            reduction = None
            for mb, outputs, lo in collected:
                reduction = window_reduction(reduction, lo)
                for metric in (session.metrics if training else session.eval_metrics):
                    metric.update(mb, outputs, lo)
            result = {'loss': reported_loss(reduction, loss_sum, items), 'num_items': items,
                      'num_tokens': sum(int(mb['num_tokens']) for mb, _, _ in collected),
                      '_reduction': reduction, **combine_metrics(lo for _, _, lo in collected)}
        return step.broadcast_from_last_stage(result)

    @remote_function(dispatch='slice', collect='mean')
    def forward_backward(self, *, inputs: Any, adapter_name: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
        session = self._session(adapter_name)
        if session.optimizer is None:
            raise ValueError(f'call set_optimizer(...) for adapter {session.name!r} before forward_backward')
        result = self._summarise(self._run(inputs, session, False, kwargs), session, training=True)
        reduction = result.pop('_reduction')
        session.add_to_window(LossOutput(loss=torch.zeros(()), num_items=result['num_items'],
                                         reduction=reduction or 'mean'))
        session.tokens_since_report += int(result.pop('num_tokens'))
        return result

    @remote_function(dispatch='slice', collect='mean')
    def forward_only(self, *, inputs: Any, adapter_name: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
        session = self._session(adapter_name)
        result = self._summarise(self._run(inputs, session, True, kwargs), session, training=False)
        result.pop('num_tokens')
        result.pop('_reduction')
        return result

    def forward(self, *, inputs: Any, adapter_name: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
        raise NotImplementedError('MegatronModel runs forward and backward together through megatron-core\'s '
                                  'pipeline schedule: use forward_backward (or forward_only for evaluation)')

    def calculate_loss(self, outputs: Dict[str, Any], *, adapter_name: Optional[str] = None, **kwargs: Any) -> Any:
        return self._session(adapter_name).loss(outputs['inputs'], outputs, **kwargs)

    def backward(self, loss_output: Any, *, adapter_name: Optional[str] = None, **kwargs: Any) -> None:
        raise NotImplementedError('MegatronModel runs backward inside forward_backward (pipeline schedule)')

    # ------------------------------------------------------------------ optimisation
    def clip_grad_norm(self, max_grad_norm: float = 1.0, norm_type: float = 2.0, *,
                       adapter_name: Optional[str] = None) -> float:
        raise NotImplementedError('megatron-core clips inside the optimizer step: use clip_grad_and_step')

    def step(self, *, adapter_name: Optional[str] = None) -> None:
        session = self._session(adapter_name)
        ok, grad_norm, _ = _mcore_optimizer(session).step()
        session.last_grad_norm = float(grad_norm) if grad_norm is not None else None
        if ok:
            session.optimizer_step += 1

    def zero_grad(self, *, adapter_name: Optional[str] = None) -> None:
        session = self._session(adapter_name)
        if self.ddp is not None:
            self.ddp.zero_grad_buffer()
        _mcore_optimizer(session).zero_grad()
        session.start_window()

    def lr_step(self, *, adapter_name: Optional[str] = None) -> None:
        session = self._session(adapter_name)
        if session.scheduler is not None:
            session.scheduler.step(increment=1)

    def _check_norm_type(self, norm_type: float) -> None:
        if norm_type != 2.0:
            raise ValueError('megatron-core clips by the L2 norm only (norm_type=2.0)')

    def _normalise_window(self, session: AdapterState) -> bool:
        from megatron.core.distributed import finalize_model_grads
        if window_scale(session.window_reduction, float(self.comm.reduce_sum(session.window_items.clone()))) is None:
            return False
        # Sums gradients over data-parallel ranks (per-token-loss mode) and, for 'mean' losses, divides them
        # by the window's units over all ranks; 'sum' losses keep the global sum (see twinkle.loss.base).
        tokens = None
        if session.window_reduction != 'sum':
            tokens = torch.tensor(float(session.window_items), dtype=torch.float32, device=self.device)
        finalize_model_grads([self.ddp], num_tokens=tokens)
        return True

    def _clip_and_step(self, session: AdapterState, max_grad_norm: float, norm_type: float) -> Optional[float]:
        _mcore_optimizer(session).config.clip_grad = float(max_grad_norm or 0.0)
        self.step(adapter_name=session.name)
        return session.last_grad_norm

    @remote_function(dispatch='all', collect='first')
    def set_optimizer(self, optimizer_cls: Any = 'default', *, adapter_name: Optional[str] = None,
                      **kwargs: Any) -> None:
        session = self._session(adapter_name)
        if session.optimizer is not None:
            raise ValueError('the optimizer is already set: megatron-core wraps the model once')
        self.ddp, session.optimizer, session.optimizer_kwargs = optim.wrap_with_optimizer(
            optimizer_cls, self.gpt, self.tf_config, self.precision, kwargs)
        session.start_window()

    @remote_function(dispatch='all', collect='first')
    def set_lr_scheduler(self, scheduler_cls: Any = 'default', *, adapter_name: Optional[str] = None,
                         **kwargs: Any) -> None:
        session = self._session(adapter_name)
        if session.optimizer is None:
            raise ValueError('set_optimizer(...) must come before set_lr_scheduler(...)')
        session.scheduler = optim.build_scheduler(scheduler_cls, session.optimizer, kwargs)

    # ------------------------------------------------------------------ components
    @remote_function(dispatch='all', collect='first')
    def add_adapter_to_model(self, adapter_name: str, config_or_dir: Any, *,
                             gradient_accumulation_steps: int = 1, **kwargs: Any) -> None:
        if self.sessions:
            current = self.adapter_names or 'a full-parameter session'
            raise ValueError(f'MegatronModel trains one adapter (or all parameters); it already has {current}. '
                             f'Add the adapter before set_optimizer')
        if isinstance(config_or_dir, (str, Path)):
            self.lora_spec = mio.attach_saved_adapter(self.shard, str(config_or_dir))
        else:
            self.lora_spec = lora.spec_from_config(config_or_dir)
            lora.attach(self.gpt, self.lora_spec, self.tf_config)
        self._new_adapter_session(adapter_name, gradient_accumulation_steps)

    def apply_patch(self, patch: Any, **kwargs: Any) -> Any:
        raise NotImplementedError('patches target the Hugging Face module of TransformersModel; MegatronModel '
                                  'has none')

    # ------------------------------------------------------------------ checkpoint hooks
    def _gather_weights(self, session: AdapterState) -> Optional[Dict[str, Any]]:
        return mio.hf_state_dict(self.shard, adapter=session.name is not None)

    def _write_weights(self, folder: Path, session: AdapterState, weights: Dict[str, Any]) -> None:
        mio.write_weights(folder, weights, lora_spec=self.lora_spec if session.name is not None else None,
                          hf_config=self.hf_config, model_id=self.model_id)
        with contextlib.suppress(Exception):  # a checkpoint without a tokenizer is still a checkpoint
            self.tokenizer.save_pretrained(str(folder))

    def _load_weights(self, folder: Path, session: AdapterState) -> None:
        mio.load_weights(folder, self.shard, self.lora_spec if session.name is not None else None, session.optimizer)

    def _save_optimizer_state(self, folder: Path, session: AdapterState) -> None:
        mio.save_optimizer_state(folder, session.optimizer, self.comm.rank)

    def _load_optimizer_state(self, folder: Path, session: AdapterState) -> None:
        mio.load_optimizer_state(folder, session.optimizer, self.comm.rank, self.device)

    def _trainer_state_extra(self) -> Dict[str, Any]:
        return {'world_size': self.mesh.world_size, 'strategy': 'megatron', 'mesh': self.mesh.to_dict()}

    def _check_resume_layout(self, folder: Path, trainer_state: Dict[str, Any]) -> None:
        mio.check_layout(folder, trainer_state, self.mesh)

    def get_state_dict(self, *, adapter_name: Optional[str] = None) -> Dict[str, Any]:
        """Hugging Face (or PEFT) tensors of the whole model on global rank 0; an empty dict on the other ranks
        (as a full state dict gathered by FSDP2)."""
        state = mio.hf_state_dict(self.shard, adapter=self._session(adapter_name).name is not None)
        return state if state is not None else {}

    def get_train_configs(self, *, adapter_name: Optional[str] = None) -> Dict[str, Any]:
        session = self._session(adapter_name)
        return {'model_id': self.model_id, 'adapter_name': session.name, 'strategy': 'megatron',
                'mesh': self.mesh.to_dict(), 'mixed_precision': self.precision,
                'optimizer': session.optimizer_kwargs, 'loss': type(session.loss).__name__,
                'scheduler': type(session.scheduler).__name__ if session.scheduler is not None else None,
                'lora': None if self.lora_spec is None else {'r': self.lora_spec.r, 'alpha': self.lora_spec.alpha,
                                                             'targets': self.lora_spec.targets},
                **session.progress()}

    def shutdown(self) -> None:
        self._writer.close()
        self.ddp = None

    def __repr__(self) -> str:
        return f'MegatronModel(model_id={self.model_id!r}, mesh={self.mesh!r}, precision={self.precision!r})'


def _default_mesh() -> Any:
    from ...mesh import DeviceMesh
    return DeviceMesh.from_sizes(world_size=context.world_size())


def _mcore_optimizer(session: AdapterState) -> Any:
    """The session's megatron-core optimizer (its step returns (ok, grad_norm, zeros), unlike torch's)."""
    if session.optimizer is None:
        raise ValueError(f'call set_optimizer(...) for adapter {session.name!r} first')
    return session.optimizer
