"""Server settings: command-line options and an optional YAML file, validated by pydantic."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator


class Limits(BaseModel):
    """Per-tenant limits. Exceeding one answers 429 (counts, rates) or 413 (sizes) with an explanation."""
    model_config = ConfigDict(extra='forbid')

    max_adapters_per_tenant: int = Field(8, ge=1)
    """Training runs (LoRA adapters) a tenant may hold loaded at once."""
    max_sampling_sessions_per_tenant: int = Field(8, ge=1)
    """Sampling adapters kept loaded per tenant; older ones are unloaded and reloaded on demand."""
    max_tokens_per_request: int = Field(65536, ge=1)
    """Tokens in one training / forward / sampling request (prompt plus requested completion)."""
    max_new_tokens: int = Field(1024, ge=1)
    """Longest completion one sample may ask for."""
    max_lora_rank: int = Field(256, ge=1)
    """Largest LoRA rank, also for every entry of a rank_pattern."""
    max_lora_alpha: float = Field(1024.0, gt=0, allow_inf_nan=False)
    """Largest LoRA alpha, also for every entry of an alpha_pattern."""
    requests_per_minute: int = Field(1200, ge=1)
    """Compute requests (training, sampling, native calls) per tenant per minute."""
    max_objects_per_tenant: int = Field(64, ge=1)
    """Server-side objects (model sessions, datasets, loaders, outputs) per tenant."""
    max_sessions_per_tenant: int = Field(64, ge=1)
    """Open Tinker sessions per tenant (a session ends with ServiceClient.close or without heartbeats)."""
    max_runs_per_tenant: int = Field(1000, ge=1)
    """Stored training runs per tenant; delete finished ones (DELETE /api/v1/twinkle/runs/<run>) for more."""
    max_checkpoints_per_tenant: int = Field(1000, ge=1)
    """Stored checkpoints (weights and sampler weights) per tenant; delete some to save more."""
    max_parked_requests_per_tenant: int = Field(256, ge=1)
    """Requests waiting in the seq_id reorder buffers of a tenant's models (each holds its body); more: 429."""
    max_body_bytes: int = Field(64 << 20, ge=1024)
    """Largest forward_backward body after decompression (zstd bodies are decompressed up to this)."""
    max_metadata_bytes: int = Field(16 << 10, ge=0)
    """Largest user_metadata (as JSON) stored with a run or checkpoint."""


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra='forbid')

    model: str = 'builtin://tiny-qwen3'
    """The base model every tenant trains adapters on (hub id or local folder, resolved by twinkle.hub)."""
    model_name: Optional[str] = None
    """The name clients use for the base model (Tinker's base_model); default: ``model``."""
    tokenizer_id: Optional[str] = None
    """What get_info reports as tokenizer id (a hub name clients can load); default: the model id without
    its scheme. Never a server path."""
    host: str = '127.0.0.1'
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = Path('twinkle-server-data')
    api_keys: List[SecretStr] = Field(default_factory=list)
    mixed_precision: str = 'auto'
    """'auto' (bf16 on CUDA, none on CPU), 'no', 'bf16' or 'fp16'."""
    lora_alpha: int = Field(32, ge=1)
    """LoRA alpha of adapters created through the Tinker API (which only sends the rank)."""
    long_poll_s: float = Field(20.0, gt=0, le=40)
    """How long retrieve_future waits before answering try_again (the Tinker client waits 45 s)."""
    reorder_timeout_s: float = Field(300.0, gt=0)
    """How long requests wait for a missing earlier seq_id before they fail."""
    fwdbwd_chunk_len: Optional[int] = Field(None, ge=1)
    """Datums per forward_backward request the Tinker SDK is told to send (None: the SDK's default); the SDK
    sends the chunks of one call in parallel and the server runs them in seq_id order."""
    job_slice_s: Optional[float] = Field(1.0, gt=0)
    """How long a sampling job computes before it lets other tenants' waiting jobs run (it resumes afterwards
    where it stopped, so one tenant's long sample cannot hold the model for everyone); None: never."""
    batch_window_ms: Optional[float] = Field(5.0, ge=0, le=1000)
    """Tinker forward / forward_backward requests of different tenants that are waiting together run as one
    batched forward and backward (each tenant's rows through its own adapter). The worker waits up to this long
    for the other recently active tenants' requests to arrive; 0: batch only what is already queued; None: no
    batching (one request at a time)."""
    batch_max_tokens: int = Field(8192, ge=1)
    """Padded tokens (rows x longest row) one batched forward may hold."""
    fwdbwd_slice_tokens: Optional[int] = Field(2048, ge=1)
    """A Tinker forward(_backward) larger than this many padded tokens runs in micro-batches of about this size
    (gradients accumulated, losses summed: the same result), and between them lets other tenants' waiting jobs
    run, like a sliced sampling job; None: one piece."""
    session_timeout_s: float = Field(300.0, gt=0)
    """A Tinker session without a heartbeat for this long is finished and its adapters unloaded (the SDK beats
    every 10 s); its runs and checkpoints stay."""
    limits: Limits = Field(default_factory=Limits)
    log_level: str = 'info'

    @field_validator('api_keys')
    @classmethod
    def _keys(cls, keys: List[SecretStr]) -> List[SecretStr]:
        for i, key in enumerate(keys):
            if len(key.get_secret_value()) < 8:
                raise ValueError(f'api_keys[{i}] is shorter than 8 characters; use a long random key')
        return keys

    @field_validator('mixed_precision')
    @classmethod
    def _precision(cls, value: str) -> str:
        if value not in ('auto', 'no', 'bf16', 'fp16'):
            raise ValueError(f"mixed_precision must be 'auto', 'no', 'bf16' or 'fp16', got {value!r}")
        return value

    @property
    def served_name(self) -> str:
        return self.model_name or self.model

    def precision(self) -> str:
        if self.mixed_precision != 'auto':
            return self.mixed_precision
        import torch
        return 'bf16' if torch.cuda.is_available() else 'no'


class ConfigError(ValueError):
    pass


def load_settings(config_file: Optional[str] = None, **overrides: Any) -> ServerSettings:
    """Settings from a YAML file (optional) with command-line values on top (None values are ignored)."""
    data: Dict[str, Any] = {}
    if config_file:
        import yaml
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f'server config {config_file} does not exist')
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f'server config {config_file} is not valid YAML: {exc}') from None
        if not isinstance(loaded, dict):
            raise ConfigError(f'server config {config_file} must be a mapping of options, got {type(loaded).__name__}')
        data.update(loaded)
    for key, value in overrides.items():
        if value is None or (key == 'api_keys' and not value):
            continue
        if key == 'api_keys':
            value = list(data.get('api_keys') or []) + list(value)
        data[key] = value
    try:
        return ServerSettings(**data)
    except ValidationError as exc:
        problems = '; '.join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        source = f' in {config_file}' if config_file else ''
        raise ConfigError(f'invalid server settings{source}: {problems}') from None
