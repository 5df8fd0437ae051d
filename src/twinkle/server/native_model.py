"""``NativeModelHandle``: the server side of a client's ``TransformersModel`` proxy.

A handle is one client's view of the shared base model. Each adapter it adds is a training run with a
server-generated internal name; the client's adapter names are only labels. Templates and processors
set through it belong to the handle, not to the shared model. Every ``do_<method>`` runs on the model
worker; the set of methods is exactly ``twinkle.wire.methods.MODEL``, and each takes the parameters of the
model method it stands for (checked at import: names, kinds and defaults). Methods that only pick the
caller's adapter are generated from ``PASS_THROUGH``; the others check what a tenant may ask for.

Whatever a handle does on the shared model goes through the engine's host as an operation of
``native_ops`` with the adapter's random stream (``Engine.run``): the same code whether the model is in this
process or on a device group of ranks. Forward outputs and losses stay with the model; a ``Handle`` here
keeps their id.
"""
from __future__ import annotations

import inspect
import uuid
import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Set

import torch

from ..model import TransformersModel as SharedModel
from ..wire import codec
from ..wire.methods import MODEL
from . import native_ops
from .context import ServerContext
from .engine import Adapter
from .errors import BadRequest, Forbidden, TooLarge
from .native_checks import finite_options, generate_options, optimizer_options
from .native_objects import ObjectTable
from .store import check_name, format_path, parse_path

_GENERATE_KWARGS = ('max_new_tokens', 'do_sample', 'temperature', 'top_k', 'top_p', 'repetition_penalty')
_FORWARD_KWARGS = ('temperature', 'loss_kwargs')
# Methods that run as sliced jobs (queue.py): generate between decoding steps, the forward passes between
# micro-batches (native_slices.py).
SLICED_METHODS = frozenset({'generate', 'forward_backward', 'forward_only'})
DEFAULT_SEED = 42  # the seed twinkle.initialize uses, so a LoRA starts as it would locally


class Ref:
    """A value kept on the server (forward outputs, a loss); the client gets a handle and a summary."""

    def __init__(self, class_name: str, value: Any, summary: Dict[str, Any]) -> None:
        self.class_name, self.value, self.summary = class_name, value, summary

    def take(self) -> Any:
        """The value, forgotten here: the call's future keeps this Ref for a while, and only the object table
        may keep the value (a handle dropped from the table frees what it holds on the model)."""
        value, self.value = self.value, None
        return value


class Handle:
    """A forward's outputs ('ModelOutput') or a loss ('LossOutput') of one adapter, kept where the model is
    under ``ref_id`` (native_ops); dropping the handle frees them there (at the owner's next call).

    backward frees the autograd graph: afterwards neither the loss nor the outputs it came from can be
    used again, so a second backward is refused instead of failing inside torch."""

    def __init__(self, kind: str, adapter: Adapter, ref_id: str, dropped: List[str],
                 source: Optional['Handle'] = None) -> None:
        self.kind, self.adapter, self.ref_id, self.source = kind, adapter, ref_id, source
        self.spent = False
        self.free = weakref.finalize(self, dropped.append, ref_id)


def _handle(value: Any, kind: str, method: str, producer: str) -> Handle:
    if not isinstance(value, Handle) or value.kind != kind:
        raise BadRequest(f'{method} takes the handle returned by {producer}(...)')
    if value.spent or (value.source is not None and value.source.spent):
        raise BadRequest(f'this {kind} handle was already used by backward (its graph is freed): run forward '
                         f'again for a new one')
    return value


class NativeModelHandle:

    def __init__(self, ctx: ServerContext, tenant: str, table: ObjectTable, model_id: Optional[str] = None,
                 **options: Any) -> None:
        served = {ctx.settings.model, ctx.settings.served_name}
        if model_id is not None and model_id not in served:
            raise BadRequest(f'model_id {model_id!r} is not served here; this server trains adapters on '
                             f'{sorted(served)}')
        self.ctx, self.tenant, self.table = ctx, tenant, table
        self.engine = ctx.engine
        self.adapters: Dict[str, Adapter] = {}
        self.optimized: Set[str] = set()     # internal names of the adapters that have an optimizer
        self.template: Any = None
        self.processor: Any = None
        self.dropped: List[str] = []         # ids of dropped handles' values, freed at the next call

    def info(self) -> Dict[str, Any]:
        return {'model_id': self.ctx.settings.served_name, 'adapters': sorted(self.adapters)}

    # -- plumbing ------------------------------------------------------------------------------------------
    def call(self, method: str, args: List[Any], kwargs: Dict[str, Any]) -> Any:
        fn = getattr(self, f'do_{method}')
        try:
            return fn(*args, **kwargs)
        except TypeError as exc:
            if 'argument' in str(exc) and f'do_{method}()' in str(exc):
                raise BadRequest(str(exc).replace(f'do_{method}()', f'{method}()')) from None
            raise

    def _adapter(self, name: Optional[str]) -> Adapter:
        if not self.adapters:
            raise BadRequest('no adapter yet: call add_adapter_to_model(name, LoraConfig(...)) first (the server '
                             'trains LoRA adapters on the shared model, never the model itself)')
        if name is None:
            if len(self.adapters) == 1:
                return next(iter(self.adapters.values()))
            if 'default' in self.adapters:
                return self.adapters['default']
            raise BadRequest(f'several adapters exist ({", ".join(sorted(self.adapters))}): pass adapter_name=')
        if name not in self.adapters:
            raise BadRequest(f'adapter {name!r} does not exist; adapters: {sorted(self.adapters)}')
        return self.adapters[name]

    def _run(self, adapter: Adapter, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(model, *args)`` of native_ops where the model is, with the adapter's random stream."""
        dropped = []
        while self.dropped:  # finalizers append from whichever thread drops a handle
            dropped.append(self.dropped.pop())
        if dropped:
            self.engine.host.call(native_ops.drop, dropped)
        return self.engine.run(adapter, fn, *args)

    def _with_optimizer(self, adapter: Adapter, method: str) -> Adapter:
        if adapter.name not in self.optimized:
            raise BadRequest(f'{method} needs an optimizer: call set_optimizer(...) for adapter '
                             f'{self._label(adapter)!r} first')
        return adapter

    def _batch(self, inputs: Any) -> Dict[str, Any]:
        if isinstance(inputs, Mapping) and 'messages' in inputs:
            inputs = [inputs]
        if isinstance(inputs, Mapping):
            batch = {k: torch.as_tensor(v) if isinstance(v, list) else v for k, v in inputs.items()}
        elif isinstance(inputs, list) and inputs:
            template = self.template or self.engine.template
            feats = []
            for i, sample in enumerate(inputs):
                if not isinstance(sample, Mapping):
                    raise BadRequest(f'inputs[{i}] must be a dict (an encoded sample or a trajectory)')
                if 'input_ids' not in sample and 'messages' in sample:
                    sample = template.encode(dict(sample))
                    if sample is None:
                        raise BadRequest(f'inputs[{i}] was dropped by the template (too long)')
                feats.append(sample)
            batch = (self.processor or self.engine.processor)(feats)
        else:
            raise BadRequest('inputs must be a non-empty list of samples / trajectories, or a dict of tensors')
        ids = batch.get('input_ids')
        if not isinstance(ids, torch.Tensor):
            raise BadRequest("inputs have no 'input_ids'")
        if ids.numel() > self.ctx.settings.limits.max_tokens_per_request:
            raise TooLarge(f'this batch holds {ids.numel()} tokens; the server accepts at most '
                           f'{self.ctx.settings.limits.max_tokens_per_request} per request '
                           f'(limits.max_tokens_per_request): send smaller batches')
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.engine.vocab_size):
            raise BadRequest(f'input_ids hold token ids outside the vocabulary [0, {self.engine.vocab_size})')
        return batch

    def _kwargs(self, kwargs: Dict[str, Any], allowed: tuple, method: str) -> Dict[str, Any]:
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise BadRequest(f'{method}: options {unknown} are not accepted by the server; allowed: {list(allowed)}')
        return kwargs

    def _checkpoint(self, path: Any) -> Any:
        store = self.ctx.store.tenant(self.tenant)
        return store.folder(store.resolve(path))

    @property
    def _slice_tokens(self) -> Optional[int]:
        return self.ctx.settings.fwdbwd_slice_tokens

    def _remove(self, adapter: Adapter) -> None:
        try:
            self.engine.host.call(native_ops.drop_adapter, adapter.name)
        finally:
            self.optimized.discard(adapter.name)
            self.engine.remove(adapter)

    def release(self) -> None:
        for adapter in self.adapters.values():
            self._remove(adapter)
        self.adapters.clear()

    # -- forward / loss / backward -------------------------------------------------------------------------
    def _ref(self, kind: str, adapter: Adapter, fn: Callable[..., Any], *args: Any,
             source: Optional[Handle] = None) -> Ref:
        ref_id = uuid.uuid4().hex
        summary = self._run(adapter, fn, adapter.name, ref_id, *args)
        return Ref(kind, Handle(kind, adapter, ref_id, self.dropped, source), summary)

    def do_forward(self, *, inputs: Any, adapter_name: Optional[str] = None, **kwargs: Any) -> Ref:
        a = self._adapter(adapter_name)
        kwargs = self._kwargs(kwargs, ('temperature',), 'forward')
        return self._ref('ModelOutput', a, native_ops.forward, self._batch(inputs), kwargs)

    def do_forward_only(self, *, inputs: Any, adapter_name: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
        a = self._adapter(adapter_name)
        kwargs = self._kwargs(kwargs, ('temperature',), 'forward_only')
        return self._run(a, native_ops.forward_only, a.name, self._batch(inputs), kwargs, self._slice_tokens)

    def do_calculate_loss(self, outputs: Any, *, adapter_name: Optional[str] = None, **kwargs: Any) -> Ref:
        source = _handle(outputs, 'ModelOutput', 'calculate_loss', 'forward')
        a = source.adapter
        if adapter_name is not None and self._adapter(adapter_name) is not a:
            raise BadRequest(f'these outputs come from another adapter than {adapter_name!r}')
        return self._ref('LossOutput', a, native_ops.calculate_loss, source.ref_id, kwargs, source=source)

    def do_backward(self, loss_output: Any, *, adapter_name: Optional[str] = None, **kwargs: Any) -> None:
        handle = _handle(loss_output, 'LossOutput', 'backward', 'calculate_loss')
        source = handle.source
        handle.spent = True  # even if backward fails halfway, the graph may be gone
        handle.free.detach()  # backward frees what the handles kept
        if source is not None:
            source.spent = True
            source.free.detach()
        self._run(handle.adapter, native_ops.backward, handle.adapter.name, handle.ref_id,
                  source.ref_id if source is not None else None)

    def _label(self, adapter: Adapter) -> Optional[str]:
        return next((k for k, v in self.adapters.items() if v is adapter), None)

    def do_forward_backward(self, *, inputs: Any, adapter_name: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
        return self.fwdbwd_alone(*self.fwdbwd_request(inputs=inputs, adapter_name=adapter_name, **kwargs))

    def fwdbwd_request(self, *, inputs: Any, adapter_name: Optional[str] = None, **kwargs: Any) -> tuple:
        """A forward_backward call checked: (adapter, collated batch, options)."""
        a = self._with_optimizer(self._adapter(adapter_name), 'forward_backward')
        kwargs = self._kwargs(kwargs, _FORWARD_KWARGS, 'forward_backward')
        return a, self._batch(inputs), kwargs

    def fwdbwd_alone(self, a: Adapter, batch: Dict[str, Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
        return self._run(a, native_ops.forward_backward, a.name, batch, kwargs, self._slice_tokens)

    # -- optimisation --------------------------------------------------------------------------------------
    def _invoke(self, adapter: Adapter, method: str, *args: Any, **kwargs: Any) -> Any:
        """``model.<method>(*args, adapter_name=<the adapter>, **kwargs)`` where the model is."""
        return self._run(adapter, native_ops.invoke, method, args, {**kwargs, 'adapter_name': adapter.name})

    def do_clip_grad_norm(self, max_grad_norm: float = 1.0, norm_type: float = 2.0, *,
                          adapter_name: Optional[str] = None) -> float:
        a = self._with_optimizer(self._adapter(adapter_name), 'clip_grad_norm')
        finite_options('clip_grad_norm', {'max_grad_norm': max_grad_norm, 'norm_type': norm_type})
        return self._invoke(a, 'clip_grad_norm', max_grad_norm, norm_type)

    def do_clip_grad_and_step(self, max_grad_norm: float = 1.0, norm_type: float = 2.0, *,
                              adapter_name: Optional[str] = None,
                              gradient_accumulation_steps: Optional[int] = None) -> Dict[str, Any]:
        a = self._with_optimizer(self._adapter(adapter_name), 'clip_grad_and_step')
        finite_options('clip_grad_and_step', {'max_grad_norm': max_grad_norm, 'norm_type': norm_type})
        return self._invoke(a, 'clip_grad_and_step', max_grad_norm, norm_type,
                            gradient_accumulation_steps=gradient_accumulation_steps)

    def do_set_loss(self, loss: Any, *, adapter_name: Optional[str] = None, **kwargs: Any) -> None:
        if not isinstance(loss, str) and type(loss).__module__.split('.')[0] != 'twinkle':
            raise BadRequest("set_loss takes a registered loss name (e.g. 'CrossEntropyLoss') or a component")
        self._invoke(self._adapter(adapter_name), 'set_loss', loss, **kwargs)

    def do_set_optimizer(self, optimizer_cls: Any = 'AdamW', *, adapter_name: Optional[str] = None,
                         **kwargs: Any) -> None:
        if not isinstance(optimizer_cls, str):
            raise BadRequest("set_optimizer takes an optimizer name (e.g. 'AdamW')")
        kwargs = optimizer_options(kwargs)
        a = self._adapter(adapter_name)
        self._run(a, native_ops.set_optimizer, a.name, optimizer_cls, kwargs)
        self.optimized.add(a.name)

    def do_set_lr_scheduler(self, scheduler_cls: Any = 'CosineWarmupScheduler', *,
                            adapter_name: Optional[str] = None, **kwargs: Any) -> None:
        if not isinstance(scheduler_cls, str):
            raise BadRequest("set_lr_scheduler takes a scheduler name (e.g. 'CosineWarmupScheduler')")
        finite_options('set_lr_scheduler', kwargs)
        self._invoke(self._adapter(adapter_name), 'set_lr_scheduler', scheduler_cls, **kwargs)

    def do_add_metric(self, metric: Any, *, adapter_name: Optional[str] = None, is_training: bool = True,
                      **kwargs: Any) -> None:
        if not isinstance(metric, str) and type(metric).__module__.split('.')[0] != 'twinkle':
            raise BadRequest("add_metric takes a registered metric name or a component")
        self._invoke(self._adapter(adapter_name), 'add_metric', metric, is_training=is_training, **kwargs)

    # -- adapters and components ---------------------------------------------------------------------------
    def do_add_adapter_to_model(self, adapter_name: str, config_or_dir: Any, *, gradient_accumulation_steps: int = 1,
                                seed: Optional[int] = DEFAULT_SEED, **kwargs: Any) -> None:
        check_name(adapter_name, 'adapter name')
        if adapter_name in self.adapters:
            raise BadRequest(f'adapter {adapter_name!r} already exists')
        if kwargs:
            raise BadRequest(f'add_adapter_to_model: options {sorted(kwargs)} are not accepted by the server')
        self.engine.check_capacity(self.tenant)
        store = self.ctx.store.tenant(self.tenant)
        store.check_run_room(self.ctx.settings.limits.max_runs_per_tenant)
        run_id = 'run-' + uuid.uuid4().hex[:12]
        if isinstance(config_or_dir, str):
            ckpt = store.resolve(config_or_dir)
            lora = ckpt.get('lora') or {}
            a = self.engine.add(self.tenant, run_id, 'train', lora, seed, folder=store.folder(ckpt),
                                optimizer=False, gradient_accumulation_steps=gradient_accumulation_steps)
        elif isinstance(config_or_dir, codec.LoraConfig):
            lora = {**config_or_dir.to_dict()}
            a = self.engine.add(self.tenant, run_id, 'train', lora, seed, optimizer=False,
                                gradient_accumulation_steps=gradient_accumulation_steps)
        else:
            raise BadRequest('add_adapter_to_model takes a LoraConfig or a twinkle:// checkpoint path')
        self.adapters[adapter_name] = a
        store.add_run(run_id, {'kind': 'twinkle', 'adapter_name': adapter_name, 'lora': lora,
                               'lora_rank': lora.get('r'), 'base_model': self.ctx.settings.served_name})

    def do_remove_adapter(self, adapter_name: str) -> None:
        a = self._adapter(adapter_name)
        self._remove(a)
        del self.adapters[adapter_name]

    def do_set_template(self, template: Any, **kwargs: Any) -> None:
        from ..registry import resolve
        if not isinstance(template, str):
            raise BadRequest("set_template takes a registered template name (e.g. 'Template')")
        kwargs.pop('model_id', None)  # the template must tokenize for the served model
        if 'tokenizer' in kwargs:
            raise BadRequest('set_template: the server uses the served model\'s tokenizer; tokenizer= is not accepted')
        self.template = resolve('template', template)(model_id=self.engine.model_dir, **kwargs)

    def do_set_processor(self, processor: Any, **kwargs: Any) -> None:
        from ..registry import resolve
        if not isinstance(processor, str):
            raise BadRequest("set_processor takes a registered processor name (e.g. 'InputProcessor')")
        kwargs.setdefault('pad_token_id', self.engine.pad_token_id)
        self.processor = resolve('processor', processor)(**kwargs)

    def do_apply_patch(self, patch: Any, **kwargs: Any) -> None:
        raise Forbidden('apply_patch is refused on a shared server: patches change the base model every tenant '
                        'trains on. Ask the operator to enable it server-wide instead')

    # -- checkpoints ---------------------------------------------------------------------------------------
    def do_save(self, name: str, output_dir: Optional[str] = None, save_optimizer: bool = False,
                consumed_train_samples: Optional[int] = None, *, adapter_name: Optional[str] = None) -> str:
        if output_dir is not None:
            raise BadRequest('output_dir cannot be chosen on the server: checkpoints are stored per API key and '
                             'named by the returned twinkle:// path')
        check_name(name)
        a = self._adapter(adapter_name)
        store = self.ctx.store.tenant(self.tenant)
        store.check_room(self.ctx.settings.limits.max_checkpoints_per_tenant, a.run_id, 'weights', name)
        ckpt_id, folder = store.new_checkpoint_dir()
        folder.parent.mkdir(parents=True, exist_ok=True)
        self._invoke(a, 'save', folder.name, output_dir=str(folder.parent), save_optimizer=save_optimizer,
                     consumed_train_samples=consumed_train_samples)
        store.add_checkpoint(ckpt_id, a.run_id, 'weights', name, folder,
                             {'lora': a.lora, 'base_model': self.ctx.settings.served_name,
                              'resumable': bool(save_optimizer)})
        return format_path(a.run_id, 'weights', name, scheme='twinkle')

    def do_load(self, checkpoint_dir: str, *, adapter_name: Optional[str] = None) -> None:
        a = self._adapter(adapter_name)
        self.engine.load(a, self._checkpoint(checkpoint_dir), with_optimizer=False)

    def do_resume_from_checkpoint(self, checkpoint_dir: str, resume_only_model: bool = False, *,
                                  adapter_name: Optional[str] = None) -> Dict[str, int]:
        a = self._adapter(adapter_name)
        parse_path(checkpoint_dir)
        folder = self._checkpoint(checkpoint_dir)
        self.engine.check_fits(a, folder)
        return self._invoke(a, 'resume_from_checkpoint', str(folder), resume_only_model)

    def do_get_state_dict(self, *, adapter_name: Optional[str] = None) -> Dict[str, Any]:
        a = self._adapter(adapter_name)
        return self._run(a, native_ops.state_dict, a.name)

    def do_get_train_configs(self, *, adapter_name: Optional[str] = None) -> Dict[str, Any]:
        a = self._adapter(adapter_name)
        configs = self._invoke(a, 'get_train_configs')
        configs.update(model_id=self.ctx.settings.served_name, adapter_name=self._label(a), run_id=a.run_id)
        if isinstance(configs.get('adapter_config'), dict):
            configs['adapter_config'].pop('base_model_name_or_path', None)
        return configs

    def do_generate(self, inputs: Any, generation_config: Any = None, *, adapter_name: Optional[str] = None,
                    **kwargs: Any) -> List[Dict[str, Any]]:
        a = self._adapter(adapter_name)
        config = dict(generation_config or {})
        if not isinstance(generation_config, (dict, type(None))):
            raise BadRequest('generation_config must be a dict of generation options')
        config.update(kwargs)
        config = self._kwargs(config, _GENERATE_KWARGS, 'generate')
        limit = self.ctx.settings.limits.max_new_tokens
        config.setdefault('max_new_tokens', min(64, limit))
        config = generate_options(config, limit)
        try:
            prompts = self.engine.prompt_tokens(inputs)  # token ids, whatever form they came in
        except (TypeError, ValueError) as exc:
            raise BadRequest(str(exc)) from None
        self.engine.check_tokens(prompts, 'inputs')
        budget = self.ctx.settings.limits.max_tokens_per_request
        needed = len(prompts) * (max(len(p) for p in prompts) + int(config['max_new_tokens']))
        if needed > budget:
            raise TooLarge(f'{len(prompts)} prompts of up to {max(len(p) for p in prompts)} tokens plus '
                           f'{config["max_new_tokens"]} new tokens need {needed} token slots; the server accepts '
                           f'at most {budget} per request (limits.max_tokens_per_request)')
        self.engine.check_finite(a)
        return self._run(a, native_ops.generate, a.name, prompts, config)


# Methods a handle only forwards to the shared model, and whether they need the adapter's optimizer.
PASS_THROUGH: Dict[str, bool] = {'step': True, 'zero_grad': True, 'lr_step': False, 'calculate_metric': False}
# Parameters the server takes beyond the model method's own (the LoRA seed, which a local run sets globally).
SERVER_EXTRAS: Dict[str, tuple] = {'add_adapter_to_model': ('seed',)}


def _pass_through(name: str, needs_optimizer: bool) -> Callable[..., Any]:
    target = getattr(SharedModel, name)
    signature = inspect.signature(target)

    def do(self: NativeModelHandle, *args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as exc:
            raise BadRequest(f'{name}(): {exc}') from None
        a = self._adapter(bound.arguments.get('adapter_name'))
        if needs_optimizer:
            self._with_optimizer(a, name)
        kwargs.pop('adapter_name', None)
        return self._invoke(a, name, *args, **kwargs)

    do.__name__ = do.__qualname__ = f'do_{name}'
    do.__doc__ = target.__doc__
    do.__signature__ = signature  # type: ignore[attr-defined]
    return do


for _name, _needs_optimizer in PASS_THROUGH.items():
    setattr(NativeModelHandle, f'do_{_name}', _pass_through(_name, _needs_optimizer))


def signature_drift() -> List[str]:
    """How NativeModelHandle's ``do_<method>`` differ from the shared model's methods of MODEL (empty: none)."""
    def params(fn: Any, skip: tuple = ()) -> List[tuple]:
        return [(p.name, p.kind, p.default) for p in list(inspect.signature(fn).parameters.values())[1:]
                if p.name not in skip]

    drift = [f'{name}: passed through but not declared' for name in PASS_THROUGH if name not in MODEL.methods]
    for name in MODEL.methods:
        mine = getattr(NativeModelHandle, f'do_{name}', None)
        if mine is None:
            drift.append(f'{name}: no do_{name}')
        elif params(mine, SERVER_EXTRAS.get(name, ())) != params(getattr(SharedModel, name)):
            theirs = inspect.signature(getattr(SharedModel, name))
            drift.append(f'{name}: server {inspect.signature(mine)} vs model {theirs}')
    return drift


_drift = signature_drift()
if _drift:  # the table, the model and the server must not drift
    raise RuntimeError('NativeModelHandle does not match twinkle.wire.methods.MODEL and the model methods: '
                       + '; '.join(_drift))
