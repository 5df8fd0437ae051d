"""Response bodies of the JSON routes, so ``/openapi.json`` documents each 200 answer.

Routes declare them as ``response_model`` with ``response_model_exclude_unset``: an answer carries exactly
the keys the route sets (an optional key left out stays out, as the Tinker SDK expects), and an answer
that does not fit its model fails loudly instead of reaching a client malformed. Timestamps are ISO 8601
strings.
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict


class Answer(BaseModel):
    model_config = ConfigDict(extra='forbid')


def answers(model: Any) -> Dict[str, Any]:
    """Route options that declare ``model`` as the 200 answer and keep its unset optional keys out."""
    return {'response_model': model, 'response_model_exclude_unset': True}


class Empty(Answer):
    """Nothing to report: the call was accepted."""


class Status(Answer):
    status: str


# -- Tinker: bootstrap and sessions ----------------------------------------------------------------------------
class ClientConfig(Answer):
    """Switches that tell the Tinker SDK how to talk to this server."""
    parallel_fwdbwd_chunks: bool
    proto_compress_fwdbwd: bool
    sample_join_sampling_session: bool
    custom_loss_server_side: bool
    sample_use_retrieve_futures: bool
    fwdbwd_max_chunk_len: Optional[int] = None


class SupportedModel(Answer):
    model_name: str
    trainable: bool
    sampleable: bool
    max_context_length: Optional[int] = None


class Capabilities(Answer):
    supported_models: List[SupportedModel]


class SessionCreated(Answer):
    type: Literal['create_session']
    session_id: str


class Heartbeat(Answer):
    type: Literal['session_heartbeat']


class SessionInfo(Answer):
    training_run_ids: List[str]
    sampler_ids: List[str]


class Sessions(Answer):
    sessions: List[str]


class SamplingSessionCreated(Answer):
    type: Literal['create_sampling_session']
    sampling_session_id: str


class SamplingSessionJoined(Answer):
    type: Literal['join_sampling_session']
    client_counter: int


class SamplerInfo(Answer):
    sampler_id: str
    base_model: str
    model_path: Optional[str] = None


# -- Tinker: queued work ---------------------------------------------------------------------------------------
class Accepted(Answer):
    """The work is queued; poll ``retrieve_future`` with ``request_id`` for its result."""
    request_id: str
    model_id: Optional[str] = None


class SampleAccepted(Accepted):
    sample_sequence_ids: List[str]
    """Names of the sequences this request will produce (provenance for later training requests)."""


class OptimizerConfig(Answer):
    type: str


class ModelData(Answer):
    arch: Optional[str] = None
    model_name: str
    tokenizer_id: str


class ModelInfo(Answer):
    type: Literal['get_info']
    model_id: str
    is_lora: bool
    lora_rank: Optional[int] = None
    model_name: str
    optimizer_config: OptimizerConfig
    model_data: ModelData


class TryAgain(Answer):
    """retrieve_future's answer while the work is still queued or running: ask again."""
    type: Literal['try_again']
    request_id: str
    queue_state: str


class FutureFailed(Answer):
    """retrieve_future's answer for work that failed: the error, and whether retrying can help."""
    error: str
    category: str
    request_id: str


# -- Tinker: REST listings -------------------------------------------------------------------------------------
class Cursor(Answer):
    offset: int
    limit: int
    total_count: int


class CheckpointInfo(Answer):
    checkpoint_id: str
    checkpoint_type: Literal['training', 'sampler']
    time: str
    tinker_path: str
    size_bytes: Optional[int] = None
    public: bool
    user_metadata: Optional[Dict[str, Any]] = None


class TrainingRunInfo(Answer):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    corrupted: bool
    lora_rank: Optional[int] = None
    last_request_time: str
    last_checkpoint: Optional[CheckpointInfo] = None
    last_sampler_checkpoint: Optional[CheckpointInfo] = None
    user_metadata: Optional[Dict[str, str]] = None


class TrainingRuns(Answer):
    training_runs: List[TrainingRunInfo]
    cursor: Cursor


class RunCheckpoints(Answer):
    checkpoints: List[CheckpointInfo]


class CheckpointPage(RunCheckpoints):
    cursor: Cursor


class WeightsInfo(Answer):
    base_model: str
    is_lora: bool
    lora_rank: Optional[int] = None
    optimizer_config: OptimizerConfig
    train_attn: bool
    train_mlp: bool
    train_unembed: bool


# -- native API ------------------------------------------------------------------------------------------------
class RemoteClassInfo(Answer):
    executor: str
    methods: Dict[str, str]
    """Method name -> how its result comes back ('value', 'ref', 'self' or 'none')."""


class ObjectCreated(Answer):
    object_id: str
    class_name: str
    info: Dict[str, Any]


class CallResult(Answer):
    result: Any = None
    """The encoded value (tagged JSON, see twinkle.wire.codec), a ``__ref__`` handle, or null."""
    stop: Optional[bool] = None
    """True when an iterator is exhausted."""


class ObjectInfo(Answer):
    object_id: str
    class_name: str
    transient: bool
    age_s: float


class Objects(Answer):
    objects: List[ObjectInfo]


class NativeRun(Answer):
    run_id: str
    kind: Optional[str] = None
    adapter_name: Optional[str] = None
    lora_rank: Optional[int] = None
    base_model: Optional[str] = None
    created: str
    last_request_time: str
    checkpoints: List[str]


class NativeRuns(Answer):
    runs: List[NativeRun]


class RunDeleted(Answer):
    deleted_checkpoints: int


class NativeCheckpoint(Answer):
    path: str
    run_id: str
    kind: str
    name: str
    time: str
    size_bytes: Optional[int] = None
    resumable: bool


class NativeCheckpoints(Answer):
    checkpoints: List[NativeCheckpoint]
