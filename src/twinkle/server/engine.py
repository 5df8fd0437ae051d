"""The shared base model and the adapters (training runs, sampling snapshots) living on it.

Everything here runs on the model worker thread. Each adapter has a server-generated internal name and
its own torch RNG stream, swapped in around every operation, so one tenant's work never changes the
random numbers (LoRA init, dropout, sampling) another tenant sees.
"""
from __future__ import annotations

import contextlib
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union, cast

import torch

from ..model.components import TemplateProcessorMixin
from . import model_host as ops
from .config import ServerSettings
from .errors import BadRequest, LimitReached
from .model_host import Adapter
from .queue import pause_point
from .threads import batch_compute_threads, threads_for, using_threads

# Tinker's three switches -> the projection names of Llama/Qwen-style decoders.
TINKER_TARGETS = {
    'train_attn': ('q_proj', 'k_proj', 'v_proj', 'o_proj'),
    'train_mlp': ('gate_proj', 'up_proj', 'down_proj'),
    'train_unembed': ('lm_head',),
}
# LoRA options a client may set besides r / alpha / dropout / targets. Options that would make base
# weights trainable (bias != 'none', modules_to_save) are refused: the base model is shared.
_LORA_EXTRAS = ('use_rslora', 'init_lora_weights', 'layers_to_transform', 'rank_pattern', 'alpha_pattern')
# Initialisations that only touch the adapter's own weights. PEFT's others (pissa, olora, corda, loftq, mica,
# eva, lora_ga, orthogonal ...) read or rewrite the base weights, or need a data pass the server does not do.
_SAFE_INITS = (True, False, 'gaussian')
_MAX_PATTERNS = 64          # entries of rank_pattern / alpha_pattern
_MAX_PATTERN_LEN = 200      # characters of one pattern (PEFT matches them as regular expressions)


@contextlib.contextmanager
def inference(model: Any) -> Iterator[torch.nn.Module]:
    """``model``'s unwrapped module in eval mode under its autocast, for decoding (also on a model's ranks)."""
    from ..model.transformers.generation import inference_mode
    hf = model.strategy.unwrap(model.module)
    with inference_mode(model, hf):
        yield hf


def make_host(settings: ServerSettings, log_dir: Path) -> Any:
    if settings.mesh:
        from .distributed_host import RayHost
        return RayHost(settings, log_dir)
    return ops.LocalHost(settings, log_dir)


class Engine(TemplateProcessorMixin):
    """The served model's default template and processor live in this process (``TemplateProcessorMixin``): they
    tokenize and collate requests wherever the model itself is."""

    def __init__(self, settings: ServerSettings, log_dir: Path) -> None:
        self.settings = settings
        # Where the model lives (this process, or a Ray device group): every shared operation goes through it.
        self.host = make_host(settings, log_dir)
        self.model = self.host.model  # the in-process model; None when it lives on ranks elsewhere
        try:
            self._describe()
        except BaseException:
            self.host.shutdown()  # ranks elsewhere would outlive a server that failed to start
            raise
        # Batches across tenants compute with more threads than a tenant's own work (threads.py); on a device
        # group each rank keeps its own.
        self.batch_threads = batch_compute_threads(settings) if self.host.local else None
        if self.host.local:
            # Every forward pass (each decoding step of a sample) starts with the input embeddings: there a sliced
            # job may hand the model to other tenants (queue.pause_point is a no-op for every other job).
            self.model.hf_model.get_input_embeddings().register_forward_pre_hook(
                lambda module, args: pause_point())

    def _describe(self) -> None:
        info = self.host.call(ops.describe)
        self.model_dir = info['model_dir']
        self.vocab_size: int = info['vocab_size']
        self.pad_token_id: Optional[int] = info['pad_token_id']
        self.num_hidden_layers: int = info['num_hidden_layers']
        # What clients are told about the model (capabilities, get_info), read once here.
        self.max_context_length: Optional[int] = info['max_context_length']
        self.architecture: Optional[str] = info['architecture']
        self.adapters: Dict[str, Adapter] = {}
        self.linear_names: List[str] = info['linear_names']
        # Whether one forward can run each row through another adapter (batching across tenants; not under tp).
        self.per_row_adapters: bool = info['per_row_adapters']
        # Whether the model adds a router loss over the whole batch (MoE): its calls are not batched or sliced.
        self.router_loss: bool = info['router_loss']
        # PEFT cannot add an adapter once every adapter has been deleted (its active adapter would dangle), so
        # one inert adapter (B = 0: the base model's outputs) stays for the server's lifetime.
        self.host.call(ops.add_adapter, 'anchor', self.lora_config({'r': 1, 'target_modules': self.linear_names[:1]}),
                       1, 0)

    @property
    def distributed(self) -> bool:
        return not self.host.local

    def run(self, adapter: Adapter, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(model, *args)`` where the model lives, with the adapter's own RNG streams (kept afterwards)."""
        if self.adapters.get(adapter.name) is not adapter:
            raise BadRequest('this adapter is no longer loaded on the server (released or evicted)')
        result, rng, cuda_rng = self.host.call_with_rng(fn, args, adapter.rng, adapter.cuda_rng)
        adapter.rng = rng
        if cuda_rng is not None:
            adapter.cuda_rng = cuda_rng
        adapter.last_used = time.monotonic()
        return result

    def require_local(self, what: str) -> None:
        """Refuse a feature that needs the model in the server process."""
        if self.distributed:
            raise BadRequest(f'{what} is not available on this server: its base model is distributed over '
                             f'{self.settings.mesh} ranks (server option mesh); use the Tinker API')

    def shutdown(self) -> None:
        self.host.shutdown()

    def save_state(self) -> Callable[[], None]:
        """What a paused job left in the shared model (active adapter, train/eval mode, RNG streams), and the
        function that puts it back before the job resumes; other jobs run in between."""
        from ..model.transformers import adapters
        model = self.model
        active, training = model._active_adapter, model.module.training
        devices = self._devices()
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if devices else None

        def restore() -> None:
            if active is not None and model._active_adapter != active:
                adapters.activate(model.module, active)
                model._active_adapter = active
            model.module.train(training)
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)

        return restore

    def prompt_tokens(self, inputs: Any) -> List[List[int]]:
        """One list of token ids per prompt, from token ids, conversations or trajectories (TypeError if not)."""
        from types import SimpleNamespace

        from ..model.transformers.generation import as_prompts
        return as_prompts(cast(Any, SimpleNamespace(template=self.template)), inputs)

    # -- adapters ------------------------------------------------------------------------------------------
    def count(self, tenant: str, role: str) -> int:
        # Read from the event loop while the worker may add adapters: iterate over a snapshot.
        return sum(1 for a in list(self.adapters.values()) if a.tenant == tenant and a.role == role)

    def check_capacity(self, tenant: str) -> None:
        limit = self.settings.limits.max_adapters_per_tenant
        if self.count(tenant, 'train') >= limit:
            raise LimitReached(f'this API key already has {limit} training runs loaded '
                               f'(limits.max_adapters_per_tenant); release one (remove_adapter / drop the client) '
                               f'before creating another')

    def lora_config(self, lora: Dict[str, Any]) -> Any:
        """A peft LoraConfig from a tenant's options, each checked: nothing may change the shared base weights
        or exceed the rank / alpha limits."""
        from peft import LoraConfig
        lora = dict(lora)
        r = self._rank(lora.pop('r', None), 'r')
        alpha = self._alpha(lora.pop('lora_alpha', self.settings.lora_alpha), 'lora_alpha')
        dropout = lora.pop('lora_dropout', 0.0)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise BadRequest(f'lora_dropout must be in [0, 1), got {dropout!r}')
        targets = lora.pop('target_modules', 'all-linear')
        if targets != 'all-linear':
            targets = [targets] if isinstance(targets, str) else targets
            if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
                raise BadRequest("target_modules must be 'all-linear' or a list of module names")
            unknown = sorted(set(targets) - set(self.linear_names))
            if unknown:
                raise BadRequest(f'target_modules {unknown} are not linear layers of the base model; '
                                 f'choose from {self.linear_names}')
        bias = lora.pop('bias', 'none')
        if bias != 'none':
            raise BadRequest(f"bias={bias!r} would train the shared base model's biases; only bias='none' is allowed")
        extra = lora.pop('extra', {}) or {}
        lora.update(extra)
        unknown = sorted(set(lora) - set(_LORA_EXTRAS))
        if unknown:
            raise BadRequest(f'LoRA options {unknown} are not accepted by the server; allowed besides r, lora_alpha, '
                             f'lora_dropout, target_modules, bias: {list(_LORA_EXTRAS)}')
        self._check_extras(lora)
        return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=targets, **lora)

    def _rank(self, value: Any, name: str) -> int:
        limit = self.settings.limits.max_lora_rank
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise BadRequest(f'LoRA {name}={value!r} must be an integer rank in 1..{limit} (limits.max_lora_rank)')
        return value

    def _alpha(self, value: Any, name: str) -> float:
        limit = self.settings.limits.max_lora_alpha
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= limit:
            raise BadRequest(f'LoRA {name}={value!r} must be a positive number up to {limit} '
                             f'(limits.max_lora_alpha)')
        return value

    def _check_extras(self, lora: Dict[str, Any]) -> None:
        init = lora.get('init_lora_weights', True)
        if not any(init is safe or (isinstance(safe, str) and init == safe) for safe in _SAFE_INITS):
            raise BadRequest(f'init_lora_weights={init!r} is not accepted on a shared server (it would read or '
                             f'rewrite the base weights every tenant trains on); use one of {list(_SAFE_INITS)}')
        if not isinstance(lora.get('use_rslora', False), bool):
            raise BadRequest(f"use_rslora must be true or false, got {lora['use_rslora']!r}")
        for option, check in (('rank_pattern', self._rank), ('alpha_pattern', self._alpha)):
            pattern = lora.get(option)
            if pattern is None:
                continue
            if not isinstance(pattern, dict) or len(pattern) > _MAX_PATTERNS:
                raise BadRequest(f'{option} must be a mapping of up to {_MAX_PATTERNS} module-name patterns to values')
            for key, value in pattern.items():
                if not isinstance(key, str) or not key or len(key) > _MAX_PATTERN_LEN:
                    raise BadRequest(f'{option} keys must be module-name patterns of 1..{_MAX_PATTERN_LEN} '
                                     f'characters, got {key!r}')
                try:
                    re.compile(key)
                except re.error as exc:
                    raise BadRequest(f'{option} key {key!r} is not a valid pattern: {exc}') from None
                check(value, f'{option}[{key!r}]')
        layers = lora.get('layers_to_transform')
        if layers is not None:
            count = self.num_hidden_layers
            items = [layers] if isinstance(layers, int) else layers
            if not isinstance(items, list) or not items or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < count for i in items):
                raise BadRequest(f'layers_to_transform must be a layer index or a list of them in 0..{count - 1}, '
                                 f'got {layers!r}')

    def add(self, tenant: str, run_id: str, role: str, lora: Dict[str, Any], seed: Optional[int],
            folder: Optional[Path] = None, optimizer: bool = True, gradient_accumulation_steps: int = 1) -> Adapter:
        """A new adapter from ``lora`` (initialised from ``seed``) or from a checkpoint ``folder``.

        A checkpoint's adapter is built from its (checked) recorded options, never from the folder's config
        file, and then takes the folder's weights."""
        name = 'a' + uuid.uuid4().hex[:16]
        config = self.lora_config(lora if folder is None else {**lora, 'init_lora_weights': False})
        seed = int(seed) if seed is not None else int(uuid.uuid4().int % (2 ** 31))
        rng, cuda_rng = self.host.call(ops.add_adapter, name, config, gradient_accumulation_steps, seed)
        adapter = Adapter(tenant, run_id, name, role, dict(lora), rng, cuda_rng)
        self.adapters[name] = adapter
        if folder is not None:
            try:
                self.load(adapter, folder, with_optimizer=False)
            except Exception:
                self.remove(adapter)
                raise
        if optimizer:
            try:
                self.host.call(ops.set_default_optimizer, name)
            except Exception:
                self.remove(adapter)
                raise
        return adapter

    def remove(self, adapter: Adapter) -> None:
        if self.adapters.pop(adapter.name, None) is not None:
            self.host.call(ops.remove_adapter, adapter.name)

    def evict_samplers(self, tenant: str, keep: int) -> None:
        samplers = sorted((a for a in self.adapters.values() if a.tenant == tenant and a.role == 'sampler'),
                          key=lambda a: a.last_used)
        for adapter in samplers[:max(0, len(samplers) - keep)]:
            self.remove(adapter)

    @contextlib.contextmanager
    def inference(self) -> Iterator[torch.nn.Module]:
        """The unwrapped module in eval mode under the model's autocast, for decoding."""
        self.require_local('decoding in the server process')
        with inference(self.model) as hf:
            yield hf

    def sample_many(self, calls: Sequence[Any]) -> List[Any]:
        """``sampling.sample_many`` here, or on the model's ranks when it lives elsewhere."""
        from .sampling import sample_many
        if self.distributed:  # the decode loop runs on every rank, each from the same streams
            from .distributed_host import sample_on_ranks
            return sample_on_ranks(self, calls, inference)
        with using_threads(self.batch_threads if len(calls) > 1 else None):
            return sample_many(self, calls)

    # -- batched forward/backward across tenants (see batching.py) ---------------------------------------------
    def forward_backward_routed(self, parts: Sequence[Tuple[Any, ...]]
                                ) -> List[Union[ops.RoutedSummary, BaseException]]:
        """``parts`` ((adapter name, collated batch, loss function, train[, loss kwargs]) each) as one forward and
        backward, each part's rows through its own adapter, where the model lives (on a device group every rank
        runs the same parts): per part its ``model_host.RoutedSummary`` or the exception it raised alone. A part
        with loss function None trains with its adapter's own loss; its summary's ``result`` is what
        ``forward_backward`` returns (``routed.RoutedPart``)."""
        from ..model.transformers.routed import RoutedPart
        with using_threads(self.batch_threads if len(parts) > 1 else None):
            return self.host.call(ops.forward_backward_routed, [RoutedPart(*part) for part in parts])

    def own_threads(self, tokens: int) -> Optional[int]:
        """The thread count of a tenant's own forward/backward of ``tokens`` padded tokens here (None: as it is;
        ``threads.threads_for``)."""
        return threads_for(tokens, self.batch_threads, self.settings.parallel_tokens)

    def routable(self, adapter_name: str) -> bool:
        """Whether the adapter can share a batched forward (no dropout or variant drawing per batch, a model
        without fp16 loss scaling or sequence splitting); the model's ranks answer for a device group."""
        return bool(self.host.call(ops.routable, adapter_name))

    @contextlib.contextmanager
    def using(self, adapter: Adapter) -> Iterator[None]:
        """Run with the adapter's own RNG stream, and keep the stream's new state afterwards."""
        if self.adapters.get(adapter.name) is not adapter:
            raise BadRequest('this adapter is no longer loaded on the server (released or evicted)')
        with ops.adapter_stream(adapter):
            try:
                yield
            finally:
                adapter.last_used = time.monotonic()

    @staticmethod
    def _devices() -> List[int]:
        return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save(self, adapter: Adapter, folder: Path, with_optimizer: bool) -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        self.run(adapter, ops.save_adapter, adapter.name, str(folder), with_optimizer)

    def load(self, adapter: Adapter, folder: Path, with_optimizer: bool) -> None:
        self.check_fits(adapter, folder)
        self.run(adapter, ops.load_adapter, adapter.name, str(folder), with_optimizer)

    def check_fits(self, adapter: Adapter, folder: Path) -> None:
        """Refuse a checkpoint whose weights do not fit the adapter (another rank or other modules) before
        anything is copied, so a failed load leaves the adapter as it was."""
        from safetensors import safe_open

        from ..model.checkpoint import ADAPTER_WEIGHTS
        path = Path(folder) / ADAPTER_WEIGHTS
        if not path.is_file():
            raise BadRequest('this checkpoint holds no adapter weights')
        have = self.host.call(ops.adapter_shapes, adapter.name)
        with safe_open(str(path), framework='pt') as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        if saved == have:
            return
        wrong = sorted(k for k in saved.keys() & have.keys() if saved[k] != have[k])
        if wrong:
            k = wrong[0]
            raise BadRequest(f'the checkpoint does not fit this adapter: {k.split(".lora_")[0].rsplit(".", 1)[-1]} has '
                             f'shape {list(saved[k])} there and {list(have[k])} here (a different LoRA rank?); '
                             f'load it into a run created with the same LoRA config, or create a run from it')
        raise BadRequest(f'the checkpoint does not fit this adapter: it holds {len(saved)} weights for other modules '
                         f'than this adapter\'s {len(have)} (different target_modules?); load it into a run created '
                         f'with the same LoRA config, or create a run from it')

    def check_finite(self, adapter: Adapter) -> None:
        """Sampling from NaN / inf weights fails inside torch; say what happened instead."""
        if not self.host.call(ops.adapter_finite, adapter.name):
            raise BadRequest('the adapter\'s weights are not finite (training diverged, e.g. a too large '
                             'learning rate): load an earlier checkpoint or start a new run')

    def check_tokens(self, rows: List[List[int]], what: str) -> None:
        for i, row in enumerate(rows):
            bad = [t for t in row if not 0 <= t < self.vocab_size]
            if bad:
                raise BadRequest(f'{what}[{i}] holds token ids outside the vocabulary [0, {self.vocab_size}): '
                                 f'{bad[:5]}')
