"""Where the served base model lives, behind the few operations the engine needs.

The engine never calls the model object directly for shared work; it sends a module-level function
``fn(model, *args)`` to its host: :class:`LocalHost` runs it on the model in this process,
``distributed_host.RayHost`` runs it on every rank of a Ray device group (FSDP2) and answers with rank 0's
result. Functions are sent by reference, so they live here (importable on every rank), not in closures.
Each operation that belongs to an adapter carries the adapter's RNG streams: every rank starts from the
same state, so LoRA init, dropout and sampling draw the same numbers on every rank and in one process.
"""
from __future__ import annotations

import contextlib
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

from .config import ServerSettings


def devices() -> List[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def with_rng(fn: Callable[..., Any], model: Any, args: tuple, rng: Optional[torch.Tensor],
             cuda_rng: Optional[List[torch.Tensor]]) -> Tuple[Any, Any, Any]:
    """``fn(model, *args)`` from the RNG state ``rng`` / ``cuda_rng``, and the state it leaves; every generator
    of the process is put back afterwards (no adapter moves another's stream)."""
    if rng is None:
        return fn(model, *args), None, None
    devs = devices()
    with torch.random.fork_rng(devices=devs):
        torch.set_rng_state(rng)
        if devs and cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        result = fn(model, *args)
        return result, torch.get_rng_state(), (torch.cuda.get_rng_state_all() if devs else None)


@dataclass
class Adapter:
    tenant: str
    run_id: str
    name: str                    # internal adapter name in the model
    role: str                    # 'train' | 'sampler'
    lora: Dict[str, Any]
    rng: torch.Tensor
    cuda_rng: Optional[List[torch.Tensor]] = None  # the same stream on each GPU (LoRA dropout, sampling)
    last_used: float = field(default_factory=time.monotonic)
    optimizer_config: Dict[str, Any] = field(default_factory=dict)



@contextlib.contextmanager
def adapter_stream(adapter: Adapter) -> Iterator[None]:
    """Run with the adapter's own RNG stream and keep the stream's new state afterwards. fork_rng puts every
    generator back afterwards, GPUs included: no tenant moves another's stream."""
    devs = devices()
    with torch.random.fork_rng(devices=devs):
        torch.set_rng_state(adapter.rng)
        if devs and adapter.cuda_rng is not None:
            torch.cuda.set_rng_state_all(adapter.cuda_rng)
        try:
            yield
        finally:
            adapter.rng = torch.get_rng_state()
            if devs:
                adapter.cuda_rng = torch.cuda.get_rng_state_all()


class LocalHost:
    """The model in the server process (the default)."""
    local = True

    def __init__(self, settings: ServerSettings, log_dir: Path) -> None:
        from ..model import TransformersModel
        self.model = TransformersModel(model_id=settings.model, mixed_precision=settings.precision(),
                                       log_dir=str(log_dir), report_to_tensorboard=False,
                                       output_dir=str(log_dir / 'unused-output'))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)

    def call_with_rng(self, fn: Callable[..., Any], args: tuple, rng: Optional[torch.Tensor],
                      cuda_rng: Optional[List[torch.Tensor]]) -> Tuple[Any, Any, Any]:
        return with_rng(fn, self.model, args, rng, cuda_rng)

    def shutdown(self) -> None:
        pass


def router_loss(hf_model: Any) -> bool:
    """Whether the model adds a router load-balancing loss (MoE with ``output_router_logits``): a figure of the
    whole batch, so its calls can be neither split into micro-batches nor share a batch with others."""
    config = hf_model.config
    text = config.get_text_config() if hasattr(config, 'get_text_config') else config
    return bool(getattr(config, 'output_router_logits', False) or getattr(text, 'output_router_logits', False))


# -- operations (run where the model is) ---------------------------------------------------------------------
def describe(model: Any) -> Dict[str, Any]:
    """What the engine and the routes read about the base model, once."""
    hf = model.hf_model
    config = hf.config
    return {
        'model_dir': model.model_dir,
        'vocab_size': int(hf.get_input_embeddings().weight.shape[0]),
        'max_context_length': getattr(config, 'max_position_embeddings', None),
        'architecture': (getattr(config, 'architectures', None) or [None])[0],
        'num_hidden_layers': int(getattr(config, 'num_hidden_layers', 0) or 0),
        'linear_names': sorted({n.rsplit('.', 1)[-1] for n, m in hf.named_modules()
                                if isinstance(m, torch.nn.Linear)}),
        'pad_token_id': model.template.pad_token_id,
        'per_row_adapters': bool(model.strategy.per_row_adapters),
        'router_loss': router_loss(hf),
    }


def add_adapter(model: Any, name: str, config: Any, gradient_accumulation_steps: int, seed: int
                ) -> Tuple[torch.Tensor, Optional[List[torch.Tensor]]]:
    """Add ``name`` initialised from ``seed``; the adapter's RNG streams start where the init left them."""
    devs = devices()
    with torch.random.fork_rng(devices=devs):
        torch.manual_seed(seed)
        model.add_adapter_to_model(name, config, gradient_accumulation_steps=gradient_accumulation_steps)
        return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if devs else None)


def remove_adapter(model: Any, name: str) -> None:
    model.remove_adapter(name)


def set_default_optimizer(model: Any, name: str) -> None:
    model.set_optimizer('AdamW', adapter_name=name, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0,
                        **adam_kernel(model))


def adam_kernel(model: Any) -> Dict[str, bool]:
    """How the served adapters' Adam steps: fused (one pass over each tensor, several times faster than the
    foreach step on CPU, whose kernels there are a Python loop of separate operations) where the parameters are
    plain tensors; foreach under FSDP2, whose parameters are DTensors; per tensor under tensor parallelism, which
    mixes split (DTensor) and whole parameters that foreach and fused kernels both refuse."""
    layout = getattr(model.strategy, 'name', None)
    if layout == 'tensor_parallel':
        return {}
    if layout in ('native_fsdp', 'expert_parallel'):
        return {'foreach': True}
    return {'fused': True}


def save_adapter(model: Any, name: str, folder: str, with_optimizer: bool) -> None:
    path = Path(folder)
    model.save(path.name, output_dir=str(path.parent), save_optimizer=with_optimizer, adapter_name=name)


def load_adapter(model: Any, name: str, folder: str, with_optimizer: bool) -> None:
    if with_optimizer:
        model.resume_from_checkpoint(folder, adapter_name=name)
    else:
        model.load(folder, adapter_name=name)


def adapter_shapes(model: Any, name: str) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.get_state_dict(adapter_name=name).items()}


def adapter_finite(model: Any, name: str) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in model.get_state_dict(adapter_name=name).values()
               if v.is_floating_point())


@dataclass
class RoutedSummary:
    """What one part of a routed batch gave, without its autograd graph (so that it can travel back from a
    model's ranks): its loss (the sum, as the loss computed it), the count and reduction the loss reports,
    its metrics, and its rows' per-token log-probabilities on the CPU; for a part trained with its adapter's
    own loss, ``result``: what ``forward_backward`` returns (``{'loss', 'num_items', **metrics}``)."""
    loss: float
    num_items: float
    reduction: str
    metrics: Dict[str, float]
    logps: Optional[torch.Tensor]
    result: Optional[Dict[str, Any]] = None


def forward_backward_routed(model: Any, parts: List[Any]) -> List[Union[RoutedSummary, BaseException]]:
    """Several adapters' requests as one batched forward and backward (``forward_backward_routed``); per part
    its :class:`RoutedSummary` or the exception it raised alone. An exception of the shared forward or backward
    propagates. Everything answered is plain data: once backward has run, nothing may fail on the way back (the
    caller would then run the parts again, alone, and their gradients would count twice)."""
    return [_summary(result) for result in model.forward_backward_routed(parts)]


def _summary(result: Any) -> Union[RoutedSummary, BaseException]:
    """A part's ``routed.RoutedResult`` as plain data, or the exception it raised, made portable."""
    if isinstance(result, BaseException):
        return _portable(result)
    loss = result.loss
    try:
        return RoutedSummary(loss=float(loss.loss.detach()), num_items=float(loss.num_items),
                             reduction=str(getattr(loss, 'reduction', 'mean')),
                             metrics={k: float(v) for k, v in loss.metrics.items() if _scalar(v)},
                             logps=None if result.logps is None else result.logps.detach().cpu(),
                             result=None if result.summary is None else dict(result.summary))
    except Exception as exc:  # a loss whose figures are not numbers: this part's own problem
        return _portable(exc)


def _scalar(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
        isinstance(value, torch.Tensor) and value.numel() == 1)


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, otherwise a RuntimeError with its text (an exception whose constructor
    takes other arguments than it keeps cannot be rebuilt where the batch was sent from)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f'{type(exc).__name__}: {exc}')


def routable(model: Any, name: str) -> bool:
    return bool(model.routable(name))
