"""Files shipped inside the package so Twinkle works with no network: a tiny Qwen3-shaped model
(config and tokenizer only; weights are initialised from the config) and two small datasets.

``self-cognition.jsonl`` holds ``{query, response, lang}`` rows whose responses use the placeholders
``{{NAME}}`` and ``{{AUTHOR}}``; ``alpaca-mini.jsonl`` holds ``{instruction, input, output}`` rows.
``scripts/train_tokenizer.py`` regenerates the tokenizer files.
"""
from __future__ import annotations

from pathlib import Path

ASSETS_DIR: Path = Path(__file__).resolve().parent
TINY_QWEN3_DIR: Path = ASSETS_DIR / 'tiny-qwen3'
DATASETS: dict[str, Path] = {
    'self-cognition': ASSETS_DIR / 'datasets' / 'self-cognition.jsonl',
    'alpaca-mini': ASSETS_DIR / 'datasets' / 'alpaca-mini.jsonl',
}

__all__ = ['ASSETS_DIR', 'TINY_QWEN3_DIR', 'DATASETS']
