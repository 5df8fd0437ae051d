"""Checks of the hyperparameters a tenant passes to native model calls (before anything reaches the model)."""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping

from .errors import BadRequest, TooLarge


def finite_options(method: str, options: Mapping[str, Any]) -> None:
    """Numbers a tenant passes as hyperparameters must be finite: inf / NaN would make the weights NaN."""
    def walk(value: Any, where: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise BadRequest(f'{method}: {where}={value!r} must be a finite number')
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f'{where}[{i}]')
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f'{where}[{k!r}]')

    for key, value in options.items():
        walk(value, key)


def optimizer_options(options: Dict[str, Any]) -> Dict[str, Any]:
    finite_options('set_optimizer', options)
    betas = options.get('betas')
    if betas is not None:
        if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
            raise BadRequest(f'set_optimizer: betas must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {betas!r}')
    for key, low, strict in (('lr', 0, False), ('eps', 0, True), ('weight_decay', 0, False)):
        value = options.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or (strict and value == low):
            raise BadRequest(f'set_optimizer: {key} must be a number {">" if strict else ">="} {low}, got {value!r}')
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def generate_options(config: Dict[str, Any], limit: int) -> Dict[str, Any]:
    finite_options('generate', config)
    max_new = config.get('max_new_tokens')
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise BadRequest(f'generate: max_new_tokens must be a positive integer, got {max_new!r}')
    if max_new > limit:
        raise TooLarge(f'max_new_tokens={max_new} is above the limit {limit} (limits.max_new_tokens)')
    for key, low, high in (('temperature', 0.0, None), ('top_p', 0.0, 1.0), ('repetition_penalty', 0.0, None)):
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or \
                (high is not None and value > high) or (key != 'temperature' and value == low):
            raise BadRequest(f'generate: {key}={value!r} is out of range')
    top_k = config.get('top_k')
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise BadRequest(f'generate: top_k must be a non-negative integer, got {top_k!r}')
    if not isinstance(config.get('do_sample', False), bool):
        raise BadRequest(f"generate: do_sample must be true or false, got {config['do_sample']!r}")
    return config
