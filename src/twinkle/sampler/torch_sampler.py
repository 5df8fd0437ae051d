"""TorchSampler: rollouts through the generation core (``core.py``: transformers ``generate`` with the KV
cache) on the sampler's own copy of the model.

Logprobs: ``logprobs[i]`` is ``log_softmax(logits / temperature)[token_ids[i]]`` of the model's raw
logits, i.e. of the temperature-scaled distribution *before* top-k / top-p truncation and repetition
penalty (those only choose which tokens may be drawn). That is exactly what a trainer computes for the
same sequence with the same temperature (``GRPOLoss(temperature=...)``), so importance ratios start at
1. Greedy decoding (temperature 0) reports the unscaled (temperature 1) distribution.
"""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, cast

import torch
from torch import nn

from twinkle.registry import register
from twinkle.runtime.remote import remote_class, remote_function
from twinkle.sampler.base import Sampler, group_results
from twinkle.sampler.kv_cache import check_cache_implementation, prepare_cache
from twinkle.sampler.types import SampleResult, SamplingParams
from twinkle.sampler.weights import as_peft_config, base_state_dict, copy_into, named_targets
from twinkle.types import IGNORE_INDEX

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)


def _default_device() -> torch.device:
    return torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else torch.device('cpu')


@register('sampler')
@remote_class
class TorchSampler(Sampler):
    """Sample with ``model.generate`` on a private copy of the model.

    Args:
        model_id: hub id or folder (``'builtin://tiny-qwen3'``, ``'hf://...'``, a path); weights found
            there are loaded, a config-only folder gives random weights to be overwritten by a sync.
        model: instead of ``model_id``, a twinkle model or a Hugging Face module whose architecture and
            base weights are copied (never shared: training must not change what the sampler serves).
        template: a Template (or registered name) to encode messages; default: the model's tokenizer.
        device / dtype: where and in what precision the copy lives (default cuda + bfloat16 when
            available, else cpu + float32).
        cache_implementation: the KV cache ('dynamic' default, 'static', 'offloaded', 'offloaded_static'
            (CUDA only), 'quantized' (needs optimum-quanto or hqq), 'sliding_window' (models configured
            with a sliding window)).
        generation_config: a transformers GenerationConfig (or dict) whose end tokens, cache settings
            and sampling defaults apply to every call.
        max_batch_size: sequences generated at once (prompts x n); None = all.
        compile: let transformers ``torch.compile`` the decoding step of static caches on CUDA (off by
            default: rollout shapes change every call, and each new shape recompiles).
    """

    def __init__(self, model_id: Optional[str] = None, *, model: Any = None, template: Any = None,
                 device: Optional[Any] = None, dtype: Optional[torch.dtype] = None,
                 cache_implementation: Optional[str] = None, generation_config: Any = None,
                 max_batch_size: Optional[int] = None, compile: bool = False, **model_kwargs: Any) -> None:
        if (model_id is None) == (model is None):
            raise ValueError('TorchSampler needs exactly one of model_id= (e.g. "builtin://tiny-qwen3") or model=')
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f'max_batch_size must be >= 1 or None; got {max_batch_size}')
        self.device = torch.device(device) if device is not None else _default_device()
        self.dtype = dtype or (torch.bfloat16 if self.device.type == 'cuda' else torch.float32)
        self.max_batch_size = max_batch_size
        self.model_dir: Optional[str] = None
        self.hf_model = self._load(model_id, model, model_kwargs).to(self.device).eval()
        self.hf_model.requires_grad_(False)
        self.module: nn.Module = self.hf_model  # a PeftModel once an adapter exists
        self._targets = named_targets(self.hf_model)
        self.generation_config = self._base_generation_config(generation_config)
        if cache_implementation is not None:
            self.generation_config.cache_implementation = cache_implementation
        self.generation_config.disable_compile = not compile
        self._check_cache(self.generation_config)
        if template is not None:
            self.set_template(template)
        elif self.model_dir is not None:
            self.set_template('Template', model_id=self.model_dir)

    # ------------------------------------------------------------------ construction
    def _load(self, model_id: Optional[str], model: Any, kwargs: Dict[str, Any]) -> nn.Module:
        from transformers import AutoModelForCausalLM

        kwargs = dict(kwargs)
        kwargs.setdefault('dtype', self.dtype)
        if model_id is not None:
            from twinkle.hub import resolve
            self.model_dir = resolve(model_id)
            return AutoModelForCausalLM.from_pretrained(self.model_dir, **kwargs)
        source = getattr(model, 'hf_model', model)
        if not isinstance(source, nn.Module) or not hasattr(source, 'config'):
            raise TypeError(f'TorchSampler(model=...) takes a twinkle model or a Hugging Face module; '
                            f'got {type(model).__name__}')
        self.model_dir = getattr(model, 'model_dir', None) or getattr(source, 'name_or_path', None) or None
        # A fresh module of the same architecture, then the source's base weights (adapters stripped).
        copy = AutoModelForCausalLM.from_config(source.config, **kwargs)
        with torch.no_grad():
            copy_into(named_targets(copy), base_state_dict(source.state_dict()), 'TorchSampler')
        if getattr(source, 'generation_config', None) is not None:
            copy.generation_config = source.generation_config
        return copy

    def _base_generation_config(self, override: Any) -> Any:
        from transformers import GenerationConfig
        base = getattr(self.hf_model, 'generation_config', None)
        config = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
        if override is not None:
            update = override.to_dict() if hasattr(override, 'to_dict') else dict(override)
            config.update(**update)
        return config

    def _check_cache(self, config: Any) -> None:
        self._check_cache_impl(config.cache_implementation, config.cache_config)

    def _check_cache_impl(self, impl: Optional[str], cache_config: Any = None) -> None:
        check_cache_implementation(impl, self.device, self.hf_model.config, cache_config)

    # ------------------------------------------------------------------ adapters and weights
    @property
    def adapter_names(self) -> List[str]:
        return list(getattr(self.module, 'peft_config', {}) or {})

    @remote_function(dispatch='all', collect='first')
    def add_adapter(self, adapter_name: str, config_or_dir: Any) -> None:
        from peft import PeftModel, get_peft_model
        if adapter_name in self.adapter_names:
            raise ValueError(f'the sampler already has adapter {adapter_name!r}; remove_adapter it first')
        if isinstance(config_or_dir, str):
            from twinkle.hub import resolve
            folder = resolve(config_or_dir)
            if isinstance(self.module, PeftModel):
                self.module.load_adapter(folder, adapter_name=adapter_name)
            else:
                self.module = PeftModel.from_pretrained(self.hf_model, folder, adapter_name=adapter_name)
        else:
            config = as_peft_config(config_or_dir, 'TorchSampler', adapter_name)
            config.inference_mode = True
            if isinstance(self.module, PeftModel):
                self.module.add_adapter(adapter_name, config)
            else:
                self.module = get_peft_model(self.hf_model, config, adapter_name=adapter_name)
        self.module.to(self.device).eval()
        self.module.requires_grad_(False)

    @remote_function(dispatch='all', collect='first')
    def remove_adapter(self, adapter_name: str) -> None:
        self._require_adapter(adapter_name)
        cast('PeftModel', self.module).delete_adapter(adapter_name)  # an adapter exists: a PeftModel

    def _require_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.adapter_names:
            raise ValueError(f'the sampler has no adapter {adapter_name!r} (adapters: {self.adapter_names or "none"}); '
                             f'add it with add_adapter or load_weights(..., adapter_config=)')

    @remote_function(dispatch='all', collect='first')
    def load_weights(self, state_dict: Mapping[str, Any], adapter_name: Optional[str] = None,
                     adapter_config: Any = None) -> None:
        if adapter_name is None:
            copy_into(self._targets, state_dict, 'TorchSampler')
            return
        if adapter_name not in self.adapter_names:
            if adapter_config is None:
                self._require_adapter(adapter_name)
            self.add_adapter(adapter_name, adapter_config)
        from peft import set_peft_model_state_dict
        state = {k: torch.as_tensor(v).to(self.device) for k, v in state_dict.items()}
        result = set_peft_model_state_dict(self.module, state, adapter_name=adapter_name)
        unexpected = list(getattr(result, 'unexpected_keys', []) or [])
        if unexpected:
            raise ValueError(f'TorchSampler.load_weights: adapter {adapter_name!r} has no tensors named '
                             f'{unexpected[:5]}; was it created with the same LoRA config as the trainer\'s?')

    @contextlib.contextmanager
    def _using(self, adapter_name: Optional[str]) -> Iterator[nn.Module]:
        """The module to run: the named adapter active, or the base model with adapters disabled."""
        if adapter_name is not None:
            self._require_adapter(adapter_name)
            peft_model = cast('PeftModel', self.module)   # adapters exist only on a PeftModel
            peft_model.set_adapter(adapter_name)
            yield peft_model
        elif self.adapter_names:
            with cast('PeftModel', self.module).disable_adapter():
                yield self.module
        else:
            yield self.hf_model

    # ------------------------------------------------------------------ sampling
    @remote_function(dispatch='slice', collect='flatten')
    @torch.no_grad()
    def sample(self, inputs: Any, sampling_params: Any = None, adapter_name: Optional[str] = None,
               **kwargs: Any) -> List[SampleResult]:
        cache = kwargs.pop('cache_implementation', None)
        config_overrides = {}
        if hasattr(sampling_params, 'cache_implementation') and sampling_params.cache_implementation:
            config_overrides['cache_implementation'] = sampling_params.cache_implementation
        if cache is not None:
            config_overrides['cache_implementation'] = cache
        params = SamplingParams.from_any(sampling_params, **kwargs)
        prompts, originals = self.prepare_prompts(inputs)
        rows = [p for p in prompts for _ in range(params.n)]
        stop_ids = self._stop_ids(params)
        step = self.max_batch_size or len(rows)
        sequences = []
        with self._using(adapter_name) as module, _seeded(params.seed, self.device):
            for start in range(0, len(rows), step):
                sequences += self._generate(module, rows[start:start + step], params, stop_ids, config_overrides)
        return group_results(prompts, originals, sequences, params.n)

    def _stop_ids(self, params: SamplingParams) -> List[int]:
        eos = self.generation_config.eos_token_id
        ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if not ids and self._template is not None and self._template.eos_token_id is not None:
            ids = [self._template.eos_token_id]
        return sorted(set(ids) | set(params.stop_token_ids))

    def _pad_id(self) -> int:
        pad = self.generation_config.pad_token_id
        if pad is None and self._template is not None:
            pad = self._template.pad_token_id
        return int(pad) if pad is not None else 0

    def _generate(self, module: nn.Module, rows: List[List[int]], params: SamplingParams, stop_ids: List[int],
                  overrides: Dict[str, Any]):
        from transformers import GenerationConfig

        from twinkle.sampler.core import DecodeSpec, GenerationRequest, generate
        if 'cache_implementation' in overrides:  # checked before transformers validates the config
            self._check_cache_impl(overrides['cache_implementation'], self.generation_config.cache_config)
        config = GenerationConfig.from_dict(self.generation_config.to_dict())
        config.update(**overrides)
        prepare_cache(config, self.device, self.hf_model.config)
        spec = DecodeSpec(max_tokens=params.max_tokens, greedy=params.greedy, temperature=params.temperature,
                          top_k=params.top_k if params.top_k > 0 else 0, top_p=params.top_p,
                          repetition_penalty=params.repetition_penalty, stop_token_ids=tuple(stop_ids),
                          stop_strings=tuple(params.stop))
        decode = self._decoder() if self._template is not None else None
        return generate(module, [GenerationRequest(rows, spec)], config, pad_id=self._pad_id(), device=self.device,
                        decode=decode)[0]

    def _decoder(self):
        return lambda ids: self._template.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ scoring
    @remote_function(dispatch='slice', collect='flatten')
    @torch.no_grad()
    def compute_logprobs(self, token_ids: Sequence[Sequence[int]], adapter_name: Optional[str] = None,
                         temperature: float = 1.0) -> List[List[float]]:
        from twinkle.loss.utils import token_logprobs
        rows = [list(r.tolist() if hasattr(r, 'tolist') else r) for r in token_ids]
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError('compute_logprobs needs a non-empty list of non-empty token id sequences')
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._pad_id(), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # right padding, as the trainer's processor lays out batches
            ids[i, :len(r)] = torch.tensor(r)
            labels[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        with self._using(adapter_name) as module:
            logits = module(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False).logits
        logps, _ = token_logprobs(logits, labels.to(self.device), temperature=temperature)
        return [logps[i, :len(r)].tolist() for i, r in enumerate(rows)]

    def __repr__(self) -> str:
        return (f'TorchSampler(model_dir={self.model_dir!r}, device={self.device}, dtype={self.dtype}, '
                f'adapters={self.adapter_names})')


@contextlib.contextmanager
def _seeded(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """Seed this call only: the caller's global random state is restored afterwards."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield
