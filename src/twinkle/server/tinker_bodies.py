"""Request bodies of the Tinker-compatible routes (JSON ones; forward_backward is protobuf).

Unknown fields are ignored where the SDK sends bookkeeping (``type``, ``sdk_version``); parameters that
change what is computed are checked strictly, so an unsupported one is a 400, never silently dropped.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class Body(BaseModel):
    # inf / NaN (Python's JSON reads them) never make sense in a request: refuse them. Strict types: a
    # string or a boolean is never taken for a number ("8" or true as a rank), nor a number for a string.
    model_config = ConfigDict(extra='ignore', allow_inf_nan=False, strict=True)


class Strict(BaseModel):
    model_config = ConfigDict(extra='forbid', allow_inf_nan=False, strict=True)


class SessionId(Body):
    session_id: str


class LoraBody(Strict):
    rank: int = Field(ge=1)
    seed: Optional[int] = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


class OptimizerConfig(Strict):
    type: str = 'adamw'


class CreateModel(Body):
    session_id: str
    model_seq_id: int = Field(ge=0)
    base_model: str
    lora_config: Optional[LoraBody] = None
    optimizer_config: Optional[OptimizerConfig] = None
    user_metadata: Optional[Dict[str, Any]] = None


class ModelId(Body):
    model_id: str


class AdamParams(Strict):
    type: Optional[str] = None
    learning_rate: float = Field(1e-4, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-12, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip_norm: float = Field(0.0, ge=0)


class OptimStep(Body):
    model_id: str
    seq_id: Optional[int] = None
    adam_params: Optional[AdamParams] = None
    optim_params: Optional[AdamParams] = None


class SaveWeights(Body):
    model_id: str
    path: Optional[str] = None
    seq_id: Optional[int] = None
    ttl_seconds: Optional[int] = None
    overwrite: bool = False
    user_metadata: Optional[Dict[str, str]] = None


class SaveForSampler(Body):
    model_id: str
    path: Optional[str] = None
    sampling_session_seq_id: Optional[int] = None
    kind: str = 'snapshot'
    seq_id: Optional[int] = None
    ttl_seconds: Optional[int] = None
    user_metadata: Optional[Dict[str, str]] = None


class LoadWeights(Body):
    model_id: Optional[str] = None
    seq_id: Optional[int] = None
    session_id: Optional[str] = None
    model_seq_id: Optional[int] = None
    base_model: Optional[str] = None
    user_metadata: Optional[Dict[str, Any]] = None
    path: str
    optimizer: bool = False
    optimizer_config: Optional[OptimizerConfig] = None
    weights_access_token: Optional[str] = None


class CreateSamplingSession(Body):
    session_id: str
    sampling_session_seq_id: int = Field(ge=0)
    base_model: Optional[str] = None
    model_path: Optional[str] = None


class Chunk(Body):
    type: str = 'encoded_text'
    tokens: Optional[List[int]] = None


class ModelInput(Body):
    chunks: List[Chunk]


class SamplingParams(Strict):
    max_tokens: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = None
    stop: Union[str, List[str], List[int], None] = None
    temperature: float = Field(1.0, ge=0)
    top_k: int = -1
    top_p: float = Field(1.0, gt=0, le=1)


MAX_TOPK = 1024  # top-k entries, target columns or alternative draws per position


class TensorData(Strict):
    """The JSON form of a tensor: dense ``data`` in row-major order, or sparse CSR (``data`` are the values)."""
    data: List[Union[int, float]]
    dtype: str
    shape: Optional[List[int]] = None
    sparse_crow_indices: Optional[List[int]] = None
    sparse_col_indices: Optional[List[int]] = None


class Sample(Body):
    num_samples: int = Field(1, ge=1, le=256)
    prompt: ModelInput
    sampling_params: SamplingParams
    base_model: Optional[str] = None
    model_path: Optional[str] = None
    sampling_session_id: Optional[str] = None
    seq_id: Optional[int] = None
    prompt_logprobs: Optional[bool] = None
    topk_prompt_logprobs: int = Field(0, ge=0, le=MAX_TOPK)
    topk_sample_logprobs: int = Field(0, ge=0, le=MAX_TOPK)
    target_prompt_logprobs: Optional[TensorData] = None
    prompt_alt_tokens_k: int = Field(0, ge=0, le=MAX_TOPK)
    prompt_logprobs_last_n: Optional[int] = Field(None, ge=1)
    record_stability_info: Optional[bool] = None


class JoinSamplingSession(Body):
    sampling_session_id: str


class Retrieve(Body):
    request_id: str
    allow_metadata_only: bool = False


class WeightsInfo(Body):
    tinker_path: str
