"""The served base model on a device group of ranks (``mesh: {fsdp: N, tp: M}``), through the Ray runtime.

Every rank holds a :class:`RankHost` (a ``TransformersModel`` sharded over the group: FSDP2 over ``fsdp``,
tensor parallelism over ``tp``, the plan's layers split first and then sharded with FSDP2 when both). The server
process keeps the HTTP front end, the queue and the adapters' bookkeeping; each model operation is one
function sent to every rank at once (they run the same collectives), and rank 0's result comes back. The
adapter's RNG state travels with the call, so every rank, and a one-process server, draws the same numbers.
Tinker forward / forward_backward requests of several tenants batch here as in one process (batching.py): every
rank runs the same routed forward and backward, and answers per request a detached summary
(``model_host.forward_backward_routed``), since a loss attached to the ranks' autograd graph cannot travel.

Not available here: time-sliced jobs (a sampling job, or a forward_backward too large to batch, runs to its end
in one piece; other tenants wait). The native model API's forward outputs and losses (tensors with autograd
graphs) stay on the ranks (native_ops.py).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..runtime.remote import remote_class
from .config import ConfigError, ServerSettings
from .errors import BadRequest
from .model_host import adapter_stream, with_rng

logger = logging.getLogger(__name__)
GROUP = 'served-model'
_USER_ERROR_NAMES = ('RegistryError', 'ValidationError')  # besides ValueError / TypeError, as errors.describe


@remote_class
class RankHost:
    """One rank's share of the served model."""

    def __init__(self, model_id: str, mixed_precision: str, log_dir: str, device_mesh: Any = None) -> None:
        from ..model import TransformersModel
        # 'native_fsdp' is FSDP2 over fsdp ranks; with tp_size > 1 the model picks tensor parallelism (then FSDP2).
        self.model = TransformersModel(model_id=model_id, mixed_precision=mixed_precision, device_mesh=device_mesh,
                                       strategy='native_fsdp', log_dir=log_dir, report_to_tensorboard=False,
                                       output_dir=str(Path(log_dir) / 'unused-output'))
        check_tensor_parallel(self.model.strategy, self.model.hf_model.config)
        # Every call reaches every rank with the same arguments: the ranks share the weights, not the batch.
        self.model.strategy.replicate_batches()

    def call_with_rng(self, fn: Callable[..., Any], args: tuple, rng: Optional[torch.Tensor],
                      cuda_rng: Optional[List[torch.Tensor]]) -> Tuple[Any, Any, Any]:
        return with_rng(fn, self.model, args, rng, cuda_rng)


def build_mesh(sizes: Dict[str, int]) -> Any:
    """The device mesh of the ``mesh`` option: ``fsdp`` x ``tp`` ranks, the tensor-parallel ranks of one FSDP
    shard adjacent (the layout TransformersModel shards FSDP2 over tensor parallelism with)."""
    from ..mesh import DeviceMesh
    return DeviceMesh.from_sizes(fsdp_size=int(sizes.get('fsdp', 1)), tp_size=int(sizes.get('tp', 1)))


def check_tensor_parallel(strategy: Any, config: Any) -> None:
    """Refuse, at start, a ``tp`` size the model cannot be split by (heads or features not divisible, no plan),
    which the model itself would find only at the first request."""
    check = getattr(strategy, 'check_model', None)  # tensor-parallel strategies have it
    if check is None:
        return
    try:
        check(config)
    except (ValueError, NotImplementedError) as exc:
        raise ConfigError(f'mesh tp={strategy.mesh.tp_size} does not fit the served model: {exc}. Choose another '
                          f'tp in the server option mesh (--mesh), or fsdp=N without tp') from None


class RayHost:
    """The driver side: forwards each operation to every rank of the group, answers rank 0's result."""
    local = False
    model = None  # the model lives on the ranks

    def __init__(self, settings: ServerSettings, log_dir: Path) -> None:
        from ..mesh import DeviceGroup
        from ..runtime import context, initialize, shutdown
        from ..runtime.ray import WorkerError
        mesh_sizes = dict(settings.mesh or {})
        mesh = build_mesh(mesh_sizes)
        ranks = mesh.world_size
        if context.is_initialized():
            raise RuntimeError(f'the server places its model with Ray itself, but twinkle is already initialised '
                               f'(mode={context.get_mode()!r}) in this process; start the server in a fresh '
                               f'process or call twinkle.runtime.shutdown() first')
        device_type = 'cuda' if torch.cuda.is_available() else 'cpu'
        initialize(mode='ray', groups=[DeviceGroup(name=GROUP, ranks=ranks, device_type=device_type)],
                   global_device_mesh=mesh, address=settings.ray_address)
        try:
            # remote_class takes ``remote_group`` at run time and answers a handle to the ranks, not a RankHost.
            placed: Any = RankHost
            self.handle = placed(settings.model, settings.precision(), str(log_dir), device_mesh=mesh,
                                 remote_group=GROUP)
        except WorkerError as exc:
            shutdown()
            if isinstance(exc.cause, ConfigError):  # the mesh does not fit the model: say so, not a traceback
                raise exc.cause from None
            raise
        except BaseException:
            shutdown()
            raise
        logger.info('served model on %d %s rank(s), mesh %s', ranks, device_type, mesh_sizes)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.call_with_rng(fn, args, None, None)[0]

    def call_with_rng(self, fn: Callable[..., Any], args: tuple, rng: Optional[torch.Tensor],
                      cuda_rng: Optional[List[torch.Tensor]]) -> Tuple[Any, Any, Any]:
        from ..runtime.ray import WorkerError
        try:
            return self.handle.call_with_rng(fn, args, rng, cuda_rng)
        except WorkerError as exc:  # the only remote failure a rank handle raises
            # A refusal raised on the ranks (a bad checkpoint, a bad request, an unknown name or a bad argument
            # of a native call) is the caller's error, as it is in one process (errors.describe); anything
            # else stays a server error with the ranks' traceback.
            from .errors import ApiError
            cause = exc.cause
            if cause is not None and (isinstance(cause, (ApiError, ValueError, TypeError))
                                      or type(cause).__name__ in _USER_ERROR_NAMES):
                raise cause from None
            raise

    def shutdown(self) -> None:
        from ..runtime import shutdown
        shutdown()


def sample_on_ranks(engine: Any, calls: Sequence[Any], decode_mode: Callable[[Any], Any]) -> List[Any]:
    """``sampling.sample_many`` on every rank (same prompts, same streams: the same tokens, the same number of
    forward passes, as FSDP2 needs); each adapter's stream moves on as it would in one process. ``decode_mode``:
    the engine's context manager that puts a model in decoding mode (``engine.inference``), run on each rank."""
    for call in calls:
        if engine.adapters.get(call.adapter.name) is not call.adapter:
            raise BadRequest('this adapter is no longer loaded on the server (released or evicted)')
    results, streams = engine.host.call(sample_here, list(calls), decode_mode)
    for call, (rng, cuda_rng) in zip(calls, streams):
        call.adapter.rng = rng
        if cuda_rng is not None:
            call.adapter.cuda_rng = cuda_rng
    return results


def sample_here(model: Any, calls: List[Any], decode_mode: Callable[[Any], Any]
                ) -> Tuple[List[Any], List[Tuple[Any, Any]]]:
    from .sampling import sample_many
    results = sample_many(_RankView(model, decode_mode), calls)
    return results, [(c.adapter.rng, c.adapter.cuda_rng) for c in calls]


class _RankView:
    """What ``sample_many`` needs of an engine, on one rank: the model, decoding mode, adapter streams."""
    distributed = False

    def __init__(self, model: Any, decode_mode: Callable[[Any], Any]) -> None:
        self.model = model
        self.decode_mode = decode_mode

    @contextlib.contextmanager
    def inference(self) -> Iterator[torch.nn.Module]:
        if getattr(self.model.strategy, 'name', None) == 'tensor_parallel':
            # Adapters added since the last forward (sampling snapshots) get their LoRA layers split like the
            # base layers they sit on before decoding (the wrap keeps what is already split).
            self.model._wrapped_module()
        with self.decode_mode(self.model) as hf:   # generation.inference_mode: FSDP2 gathers around generate
            yield hf

    @contextlib.contextmanager
    def using(self, adapter: Any) -> Iterator[None]:
        with adapter_stream(adapter):
            yield


def describe_ranks(model: Any) -> Dict[str, Any]:
    """For tests and logs: where this rank is and how its model is sharded."""
    import os
    return {'rank': int(os.environ.get('RANK', 0)), 'world_size': int(os.environ.get('WORLD_SIZE', 1)),
            'strategy': type(model.strategy).__name__}
