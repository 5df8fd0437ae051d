"""The shared base model and the adapters (training runs, sampling snapshots) living on it.

Everything here runs on the model worker thread. Each adapter has a server-generated internal name and
its own torch RNG stream, swapped in around every operation, so one tenant's work never changes the
random numbers (LoRA init, dropout, sampling) another tenant sees.
"""
from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch

from .config import ServerSettings
from .errors import BadRequest, TooMany

# Tinker's three switches -> the projection names of Llama/Qwen-style decoders.
TINKER_TARGETS = {
    'train_attn': ('q_proj', 'k_proj', 'v_proj', 'o_proj'),
    'train_mlp': ('gate_proj', 'up_proj', 'down_proj'),
    'train_unembed': ('lm_head',),
}
# LoRA options a client may set besides r / alpha / dropout / targets. Options that would make base
# weights trainable (bias != 'none', modules_to_save) are refused: the base model is shared.
_LORA_EXTRAS = ('use_rslora', 'init_lora_weights', 'layers_to_transform', 'rank_pattern', 'alpha_pattern')


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


class Engine:

    def __init__(self, settings: ServerSettings, log_dir: Path) -> None:
        from ..model import TransformersModel
        self.settings = settings
        self.model = TransformersModel(model_id=settings.model, mixed_precision=settings.precision(),
                                       log_dir=str(log_dir), report_to_tensorboard=False,
                                       output_dir=str(log_dir / 'unused-output'))
        self.model_dir = self.model.model_dir
        self.vocab_size = int(self.model.hf_model.get_input_embeddings().weight.shape[0])
        self.adapters: Dict[str, Adapter] = {}
        self.linear_names = sorted({n.rsplit('.', 1)[-1] for n, m in self.model.hf_model.named_modules()
                                    if isinstance(m, torch.nn.Linear)})
        # PEFT cannot add an adapter once every adapter has been deleted (its active adapter would dangle), so
        # one inert adapter (B = 0: the base model's outputs) stays for the server's lifetime.
        with torch.random.fork_rng(devices=self._devices()):
            torch.manual_seed(0)
            self.model.add_adapter_to_model('anchor', self.lora_config({'r': 1, 'target_modules':
                                                                        self.linear_names[:1]}))

    # -- adapters ------------------------------------------------------------------------------------------
    def count(self, tenant: str, role: str) -> int:
        # Read from the event loop while the worker may add adapters: iterate over a snapshot.
        return sum(1 for a in list(self.adapters.values()) if a.tenant == tenant and a.role == role)

    def check_capacity(self, tenant: str) -> None:
        limit = self.settings.limits.max_adapters_per_tenant
        if self.count(tenant, 'train') >= limit:
            raise TooMany(f'this API key already has {limit} training runs loaded (limits.max_adapters_per_tenant); '
                          f'release one (remove_adapter / drop the client) before creating another')

    def lora_config(self, lora: Dict[str, Any]) -> Any:
        from peft import LoraConfig
        lora = dict(lora)
        r = lora.pop('r', None)
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= self.settings.limits.max_lora_rank:
            raise BadRequest(f'LoRA rank r={r!r} must be an integer in 1..{self.settings.limits.max_lora_rank}')
        alpha = lora.pop('lora_alpha', self.settings.lora_alpha)
        dropout = lora.pop('lora_dropout', 0.0)
        if not isinstance(alpha, (int, float)) or alpha <= 0:
            raise BadRequest(f'lora_alpha must be a positive number, got {alpha!r}')
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
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
        return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=targets, **lora)

    def add(self, tenant: str, run_id: str, role: str, lora: Dict[str, Any], seed: Optional[int],
            folder: Optional[Path] = None, optimizer: bool = True, grad_accum: int = 1) -> Adapter:
        """A new adapter from ``lora`` (initialised from ``seed``) or from a checkpoint ``folder``."""
        name = 'a' + uuid.uuid4().hex[:16]
        config = self.lora_config(lora) if folder is None else None
        seed = int(seed) if seed is not None else int(uuid.uuid4().int % (2 ** 31))
        with torch.random.fork_rng(devices=self._devices()):
            torch.manual_seed(seed)
            self.model.add_adapter_to_model(name, str(folder) if folder is not None else config,
                                            gradient_accumulation_steps=grad_accum)
            adapter = Adapter(tenant, run_id, name, role, dict(lora), torch.get_rng_state(),
                              torch.cuda.get_rng_state_all() if self._devices() else None)
        self.adapters[name] = adapter
        if optimizer:
            try:
                self.model.set_optimizer('AdamW', adapter_name=name, lr=1e-4, betas=(0.9, 0.95), eps=1e-12,
                                         weight_decay=0.0)
            except Exception:
                self.remove(adapter)
                raise
        return adapter

    def remove(self, adapter: Adapter) -> None:
        if self.adapters.pop(adapter.name, None) is not None:
            self.model.remove_adapter(adapter.name)

    def evict_samplers(self, tenant: str, keep: int) -> None:
        samplers = sorted((a for a in self.adapters.values() if a.tenant == tenant and a.role == 'sampler'),
                          key=lambda a: a.last_used)
        for adapter in samplers[:max(0, len(samplers) - keep)]:
            self.remove(adapter)

    @contextlib.contextmanager
    def using(self, adapter: Adapter) -> Iterator[None]:
        """Run with the adapter's own RNG stream, and keep the stream's new state afterwards."""
        if self.adapters.get(adapter.name) is not adapter:
            raise BadRequest('this adapter is no longer loaded on the server (released or evicted)')
        devices = self._devices()
        # fork_rng puts every generator back afterwards, GPUs included: no tenant moves another's stream.
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(adapter.rng)
            if devices and adapter.cuda_rng is not None:
                torch.cuda.set_rng_state_all(adapter.cuda_rng)
            try:
                yield
            finally:
                adapter.rng = torch.get_rng_state()
                if devices:
                    adapter.cuda_rng = torch.cuda.get_rng_state_all()
                adapter.last_used = time.monotonic()

    @staticmethod
    def _devices() -> List[int]:
        return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save(self, adapter: Adapter, folder: Path, with_optimizer: bool) -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with self.using(adapter):
            self.model.save(folder.name, output_dir=str(folder.parent), save_optimizer=with_optimizer,
                            adapter_name=adapter.name)

    def load(self, adapter: Adapter, folder: Path, with_optimizer: bool) -> None:
        with self.using(adapter):
            if with_optimizer:
                self.model.resume_from_checkpoint(str(folder), adapter_name=adapter.name)
            else:
                self.model.load(str(folder), adapter_name=adapter.name)

    def check_tokens(self, rows: List[List[int]], what: str) -> None:
        for i, row in enumerate(rows):
            bad = [t for t in row if not 0 <= t < self.vocab_size]
            if bad:
                raise BadRequest(f'{what}[{i}] holds token ids outside the vocabulary [0, {self.vocab_size}): '
                                 f'{bad[:5]}')
