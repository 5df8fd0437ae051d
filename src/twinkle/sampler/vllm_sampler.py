"""VLLMSampler: rollouts with a vLLM engine (CUDA only; vllm is imported when the sampler is built).

Logprobs are vLLM's: by default those of the raw model distribution (temperature 1, before any
truncation); pass ``logprobs_mode='processed_logprobs'`` to get them after temperature and top-k/p.
LoRA adapters are served through vLLM's LoRA support: every ``load_weights(..., adapter_name=)`` writes
the tensors to a private folder and registers them under a fresh id, so the next request uses them.
"""
from __future__ import annotations

import itertools
import json
import os
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence

from twinkle.registry import register
from twinkle.runtime.remote import remote_class, remote_function
from twinkle.sampler.base import Sampler
from twinkle.sampler.types import SampledSequence, SampleResult, SamplingParams


def _require_vllm() -> Any:
    try:
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError('VLLMSampler needs a CUDA GPU; on CPU use TorchSampler')
        import vllm
    except ImportError as exc:
        raise ImportError('VLLMSampler needs the vllm package (pip install vllm, on a CUDA machine); '
                          'TorchSampler works without it') from exc
    return vllm


@register('sampler')
@remote_class
class VLLMSampler(Sampler):
    """Args: ``model_id`` (hub id or folder), ``template``, ``max_lora_rank`` (adapters up to this rank),
    ``max_loras`` (adapters held at once); other keywords go to ``vllm.LLM`` (``gpu_memory_utilization``,
    ``tensor_parallel_size``, ``dtype``, ``max_model_len``, ``logprobs_mode``...)."""

    def __init__(self, model_id: str, *, template: Any = None, max_lora_rank: int = 64, max_loras: int = 4,
                 enable_lora: bool = True, **engine_kwargs: Any) -> None:
        vllm = _require_vllm()
        from twinkle.hub import resolve
        self.model_dir = resolve(model_id)
        if enable_lora:
            engine_kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras)
        self.llm = vllm.LLM(model=self.model_dir, **engine_kwargs)
        self._lora_root = tempfile.mkdtemp(prefix='twinkle-vllm-lora-')
        self._lora_ids = itertools.count(1)
        self._adapters: Dict[str, Any] = {}  # name -> LoRARequest of its latest weights
        self._configs: Dict[str, Dict[str, Any]] = {}
        self.set_template(template if template is not None else 'Template')

    # ------------------------------------------------------------------ adapters and weights
    @property
    def adapter_names(self) -> List[str]:
        return list(self._adapters)

    @remote_function(dispatch='all', collect='first')
    def add_adapter(self, adapter_name: str, config_or_dir: Any) -> None:
        from vllm.lora.request import LoRARequest
        if isinstance(config_or_dir, str):
            from twinkle.hub import resolve
            self._adapters[adapter_name] = LoRARequest(adapter_name, next(self._lora_ids), resolve(config_or_dir))
            return
        config = config_or_dir.to_dict() if hasattr(config_or_dir, 'to_dict') else dict(config_or_dir)
        self._configs[adapter_name] = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}

    @remote_function(dispatch='all', collect='first')
    def remove_adapter(self, adapter_name: str) -> None:
        request = self._adapters.pop(adapter_name, None)
        self._configs.pop(adapter_name, None)
        if request is None:
            raise ValueError(f'the sampler has no adapter {adapter_name!r}')
        self.llm.llm_engine.remove_lora(request.lora_int_id)

    @remote_function(dispatch='all', collect='first')
    def load_weights(self, state_dict: Mapping[str, Any], adapter_name: Optional[str] = None,
                     adapter_config: Any = None) -> None:
        if adapter_name is None:
            items = list(state_dict.items())
            self.llm.apply_model(lambda model: model.load_weights(weights=items))
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
            return
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest
        if adapter_config is not None or adapter_name not in self._configs:
            if adapter_config is None:
                raise ValueError(f'the sampler has no adapter {adapter_name!r}: pass adapter_config= with its LoRA '
                                 f'config on the first load')
            self.add_adapter(adapter_name, adapter_config)
        lora_id = next(self._lora_ids)
        folder = os.path.join(self._lora_root, f'{adapter_name}-{lora_id}')
        os.makedirs(folder)
        with open(os.path.join(folder, 'adapter_config.json'), 'w') as f:
            json.dump(self._configs[adapter_name], f)
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
                  os.path.join(folder, 'adapter_model.safetensors'))
        old = self._adapters.get(adapter_name)
        self._adapters[adapter_name] = LoRARequest(adapter_name, lora_id, folder)
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)

    def _lora(self, adapter_name: Optional[str]) -> Any:
        if adapter_name is None:
            return None
        if adapter_name not in self._adapters:
            raise ValueError(f'the sampler has no weights for adapter {adapter_name!r} yet (adapters: '
                             f'{self.adapter_names or "none"}); sync them with a CheckpointEngine first')
        return self._adapters[adapter_name]

    # ------------------------------------------------------------------ sampling
    @remote_function(dispatch='slice', collect='flatten')
    def sample(self, inputs: Any, sampling_params: Any = None, adapter_name: Optional[str] = None,
               **kwargs: Any) -> List[SampleResult]:
        import vllm
        params = SamplingParams.from_any(sampling_params, **kwargs)
        prompts, originals = self.prepare_prompts(inputs)
        vparams = vllm.SamplingParams(
            n=params.n, max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, seed=params.seed, stop=params.stop or None,
            stop_token_ids=params.stop_token_ids or None, repetition_penalty=params.repetition_penalty,
            logprobs=0)
        outputs = self.llm.generate([{'prompt_token_ids': p} for p in prompts], sampling_params=vparams,
                                    lora_request=self._lora(adapter_name), use_tqdm=False)
        results = []
        for prompt, original, out in zip(prompts, originals, outputs):
            sequences = []
            for c in out.outputs:
                ids = list(c.token_ids)
                logps = [float(step[tok].logprob) for step, tok in zip(c.logprobs or [], ids)]
                sequences.append(SampledSequence(token_ids=ids, logprobs=logps, text=c.text,
                                                 stop_reason='length' if c.finish_reason == 'length' else 'stop'))
            results.append(SampleResult(prompt_token_ids=prompt, sequences=sequences, prompt=original))
        return results

    @remote_function(dispatch='slice', collect='flatten')
    def compute_logprobs(self, token_ids: Sequence[Sequence[int]], adapter_name: Optional[str] = None,
                         temperature: float = 1.0) -> List[List[float]]:
        import vllm
        rows = [list(r) for r in token_ids]
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError('compute_logprobs needs a non-empty list of non-empty token id sequences')
        vparams = vllm.SamplingParams(max_tokens=1, temperature=temperature, prompt_logprobs=0)
        outputs = self.llm.generate([{'prompt_token_ids': r} for r in rows], sampling_params=vparams,
                                    lora_request=self._lora(adapter_name), use_tqdm=False)
        result = []
        for row, out in zip(rows, outputs):
            steps = out.prompt_logprobs or []
            result.append([0.0] + [float(step[tok].logprob) for step, tok in zip(steps[1:], row[1:])])
        return result
