"""Server settings: command-line options, ``TWINKLE_SERVER_*`` environment variables and an optional YAML
file, merged and validated by pydantic-settings (flags over environment over file over defaults).

Environment names: ``TWINKLE_SERVER_PORT=8001``, nested limits with a double underscore
(``TWINKLE_SERVER_LIMITS__REQUESTS_PER_MINUTE=600``), API keys comma-separated
(``TWINKLE_SERVER_API_KEYS=key-one,key-two``).
"""
from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Dict, List, Optional, Tuple, Type

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)


class Limits(BaseModel):
    """Per-tenant limits. Exceeding one answers 429 (counts, rates) or 413 (sizes) with an explanation."""
    model_config = ConfigDict(extra='forbid')

    max_adapters_per_tenant: int = Field(8, ge=1)
    """Training runs (LoRA adapters) a tenant may hold loaded at once."""
    max_sampling_sessions_per_tenant: int = Field(8, ge=1)
    """Sampling adapters kept loaded per tenant; older ones are unloaded and reloaded on demand."""
    max_sampler_records_per_tenant: int = Field(512, ge=1)
    """Tinker sampling sessions a tenant's clients keep on record (one per sampling client, sampler weights save
    or model path sampled from directly). Beyond it the least recently used go first, after those whose
    checkpoint was deleted; using a dropped one answers 404 (a direct sample just records it again)."""
    max_recorded_samples_per_tenant: int = Field(20000, ge=1)
    """Sampled sequences kept for stable_reinforce (``record_stability_info``) per tenant, the oldest dropped."""
    max_recorded_tokens_per_tenant: int = Field(4_000_000, ge=1)
    """Tokens held by those records per tenant (a prompt counted once per request), the oldest dropped."""
    max_tokens_per_request: int = Field(65536, ge=1)
    """Tokens in one training / forward / sampling request (prompt plus requested completion)."""
    max_new_tokens: int = Field(8192, ge=1)
    """Longest completion one sample may ask for (recipes commonly ask 2048-8192)."""
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


# List settings whose entries from every source add up.
ADDITIVE_LISTS = ('api_keys', 'model_aliases')

# The YAML file of the settings being built (load_settings sets it around one construction).
_config_file: ContextVar[Optional[Path]] = ContextVar('twinkle_server_config_file', default=None)


class _ListsOfEverySource(PydanticBaseSettingsSource):
    """API keys and model aliases add up across sources instead of the strongest one winning: a file can list
    some tenants' keys (or names) and the command line or the environment add more."""

    def __init__(self, settings_cls: Type[BaseSettings], sources: Tuple[PydanticBaseSettingsSource, ...]) -> None:
        super().__init__(settings_cls)
        self.sources = sources

    def get_field_value(self, field: Any, field_name: str) -> Tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ answers for the one field

    def __call__(self) -> Dict[str, Any]:
        merged: Dict[str, Any] = {}
        for name in ADDITIVE_LISTS:
            values: List[Any] = []
            for source in self.sources:  # the flags' entries first, then the environment's, the file's
                found = source().get(name)
                values += ServerSettings.split_keys(found) if found else []
            if values:
                merged[name] = list(dict.fromkeys(values)) if name == 'model_aliases' else values
        return merged


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(extra='forbid', env_prefix='TWINKLE_SERVER_', env_nested_delimiter='__')

    model: str = 'builtin://tiny-qwen3'
    """The base model every tenant trains adapters on (hub id or local folder, resolved by twinkle.hub)."""
    model_name: Optional[str] = None
    """The name clients use for the base model (Tinker's base_model); default: ``model``."""
    model_aliases: Annotated[List[str], NoDecode] = Field(default_factory=list)
    """More names the same base model answers to, so clients written for different model names (e.g. recipe
    defaults) can share one server; each run reports the name it was created with."""
    tokenizer_id: Optional[str] = None
    """What get_info reports as tokenizer id (a hub name clients can load); default: the model id without
    its scheme. Never a server path."""
    host: str = '127.0.0.1'
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = Path('twinkle-server-data')
    api_keys: Annotated[List[SecretStr], NoDecode] = Field(default_factory=list)
    """Accepted API keys, one tenant each; keys from the file, the environment and the flags all count."""
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
    sample_batch_window_s: float = Field(0.01, ge=0, le=1.0)
    """How long a Tinker sample request waits for other tenants' sample requests to decode with it in one batch
    (each row with its own adapter; every request gets what it would get alone); 0: take only those already
    queued."""
    sample_batch_max_rows: int = Field(64, ge=1)
    """At most this many completions (summed over the batched requests) decode together."""
    batch_window_ms: Optional[float] = Field(30.0, ge=0, le=1000)
    """Tinker forward / forward_backward requests of different tenants that are waiting together run as one
    batched forward and backward (each tenant's rows through its own adapter). The worker waits for each recently
    active tenant's next request up to this long after that tenant's latest result reached it (while it waits,
    other tenants' small jobs run); 0: batch only what is already queued; None: no batching (one request at a
    time)."""
    batch_max_tokens: int = Field(8192, ge=1)
    """Padded tokens (rows x longest row) one batched forward may hold."""
    fwdbwd_slice_tokens: Optional[int] = Field(2048, ge=1)
    """A Tinker forward(_backward) larger than this many padded tokens runs in micro-batches of about this size
    (gradients accumulated, losses summed: the same result), and between them lets other tenants' waiting jobs
    run, like a sliced sampling job; None: one piece."""
    # -- throughput of the model worker -----------------------------------------------------------------------
    compute_threads: Optional[int] = Field(None, ge=1)
    """Intra-op threads torch computes with in the server process. None: ``OMP_NUM_THREADS`` when it is set,
    otherwise one less than the usable CPU cores (at least one), so that the event loop answering requests keeps
    a core: torch's threads otherwise busy-wait between operations on every core and stall it under load."""
    batch_compute_threads: Optional[int] = Field(None, ge=1)
    """Intra-op threads of a forward/backward or decode loop batched across tenants (in the server process).
    None: ``OMP_NUM_THREADS`` when it is set, otherwise every usable core: a batch is large enough to gain from
    them, and its tenants wait for it meanwhile, so the event loop has little to answer."""
    parallel_tokens: Optional[int] = Field(256, ge=1)
    """A tenant's own forward/backward of at least this many padded tokens computes with
    ``batch_compute_threads`` too: there the second core gains more than the event loop loses (2 CPU cores: 1 x 256
    tokens 1.4x faster, 128 tokens no faster). None: only batches across tenants."""
    session_timeout_s: float = Field(300.0, gt=0)
    """A Tinker session without a heartbeat for this long is finished and its adapters unloaded (the SDK beats
    every 10 s); its runs and checkpoints stay."""
    limits: Limits = Field(default_factory=Limits)
    log_level: str = 'info'
    mesh: Annotated[Optional[Dict[str, int]], NoDecode] = None
    """Place the base model on a device group of ranks through the Ray runtime instead of this process, so a model
    larger than one device is served: ``fsdp=2`` (``--mesh fsdp=2``, or ``mesh: {fsdp: 2}`` in YAML) shards it with
    FSDP2 over two ranks, ``tp=2`` splits its attention heads and MLP features over two ranks (tensor
    parallelism; tp must divide the model's head counts), ``fsdp=2,tp=2`` does both on four ranks (fsdp x tp).
    The HTTP front end stays one process. None: the model lives in the server process."""
    ray_address: Optional[str] = None
    """Ray cluster to join for ``mesh`` (None: start a local Ray instance)."""

    @classmethod
    def settings_customise_sources(cls, settings_cls: Type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource
                                   ) -> Tuple[PydanticBaseSettingsSource, ...]:
        sources: Tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        config_file = _config_file.get()
        if config_file is not None:
            sources += (YamlConfigSettingsSource(settings_cls, yaml_file=config_file),)
        return (_ListsOfEverySource(settings_cls, sources),) + sources

    @staticmethod
    def split_keys(value: Any) -> List[Any]:
        if isinstance(value, str):  # the environment's comma-separated list
            return [k.strip() for k in value.split(',') if k.strip()]
        return list(value)

    @field_validator('api_keys', 'model_aliases', mode='before')
    @classmethod
    def _key_list(cls, value: Any) -> List[Any]:
        return cls.split_keys(value)

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

    @field_validator('mesh', mode='before')
    @classmethod
    def _mesh(cls, value: Any) -> Any:
        return parse_mesh(value)

    @field_validator('model_aliases')
    @classmethod
    def _aliases(cls, aliases: List[str]) -> List[str]:
        for i, alias in enumerate(aliases):
            if not alias.strip():
                raise ValueError(f'model_aliases[{i}] is empty; give the name clients pass as base_model')
        return aliases

    @property
    def served_name(self) -> str:
        return self.model_name or self.model

    @property
    def served_names(self) -> List[str]:
        """Every name a client may pass as base_model: the served name first, then the aliases, then the id."""
        names: List[str] = []
        for name in [self.served_name, *self.model_aliases, self.model]:
            if name not in names:
                names.append(name)
        return names

    def precision(self) -> str:
        if self.mixed_precision != 'auto':
            return self.mixed_precision
        import torch
        return 'bf16' if torch.cuda.is_available() else 'no'


class ConfigError(ValueError):
    pass


MESH_AXES = ('fsdp', 'tp')  # axes the distributed engine can place the served model on (ranks: their product)


def parse_mesh(value: Any) -> Optional[Dict[str, int]]:
    """``'fsdp=2,tp=2'`` (``name=size[,name=size]``) or a mapping -> ``{'fsdp': 2, 'tp': 2}``; None / '' -> None."""
    if value is None or value == '' or value == {}:
        return None
    if isinstance(value, str):
        sizes: Dict[str, Any] = {}
        for part in value.split(','):
            name, eq, size = part.strip().partition('=')
            if not eq or not name.strip() or not size.strip():
                raise ValueError(f'mesh {value!r} must look like name=size[,name=size], e.g. fsdp=2 or fsdp=2,tp=2')
            if name.strip() in sizes:
                raise ValueError(f'mesh {value!r} names the axis {name.strip()!r} twice; give each axis once')
            sizes[name.strip()] = size.strip()
        value = sizes
    if not isinstance(value, dict):
        raise ValueError(f'mesh must be a mapping of axis to size or a string like fsdp=2, got {value!r}')
    mesh: Dict[str, int] = {}
    for name, size in value.items():
        if name not in MESH_AXES:
            raise ValueError(f'mesh axis {name!r} is not supported by the served model; use one of {list(MESH_AXES)}, '
                             f'e.g. fsdp=2 or tp=2')
        try:
            count = int(size)
        except (TypeError, ValueError):
            count = 0
        if isinstance(size, bool) or count < 1 or str(count) != str(size).strip():
            raise ValueError(f'mesh size of {name!r} must be a positive integer, got {size!r}')
        mesh[name] = count
    return mesh


# Limits that also have their own command-line option (twinkle serve --max-new-tokens ...).
_LIMIT_OPTIONS = ('max_new_tokens', 'max_tokens_per_request')


def load_settings(config_file: Optional[str] = None, **flags: Any) -> ServerSettings:
    """Settings from ``flags`` (None values are left out), the environment and a YAML file (optional)."""
    import yaml
    path = None
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f'server config {config_file} does not exist')
    given = {k: v for k, v in flags.items() if v is not None and v != []}
    # Limits with a command-line option of their own: the library merges this into the other sources' limits.
    limits = {k: given.pop(k) for k in _LIMIT_OPTIONS if k in given}
    if limits:
        given['limits'] = limits
    token = _config_file.set(path)
    try:
        return ServerSettings(**given)
    except ValidationError as exc:
        problems = '; '.join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        source = f' in {config_file}' if config_file else ''
        raise ConfigError(f'invalid server settings{source}: {problems}') from None
    except yaml.YAMLError as exc:
        raise ConfigError(f'server config {config_file} is not valid YAML: {exc}') from None
    except (TypeError, ValueError) as exc:  # what the YAML source raises for a file that is not a mapping
        if path is None:
            raise
        raise ConfigError(f'server config {config_file} must be a mapping of options ({exc})') from None
    finally:
        _config_file.reset(token)
