"""One settings object read from the environment (prefix ``TWINKLE_``), instead of scattered reads."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache() -> Path:
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(base) / 'twinkle'


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix='TWINKLE_', extra='ignore')

    cache_dir: Path = _default_cache()
    """Where embedded models are materialised and encoded datasets are cached."""
    log_dir: Path = Path('runs')
    """Where TensorBoard event files go unless a model is given its own."""
    dist_timeout_s: float = 300.0
    """How long a collective may wait before every rank gives up (no hangs on a dead peer)."""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (tests change the environment)."""
    get_settings.cache_clear()
