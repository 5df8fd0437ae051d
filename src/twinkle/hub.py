"""Model and dataset ids -> local paths.

``ms://org/name`` goes through ModelScope's ``snapshot_download``, ``hf://org/name`` through
``huggingface_hub.snapshot_download`` (which honours ``HF_HUB_OFFLINE`` and the local cache),
``builtin://name`` names the embedded default shipped in the package, and anything else must be a
local path. The embedded model's weights are not shipped: they are a seeded random initialisation,
materialised once into the cache directory, so every machine gets the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal, Optional

from .settings import get_settings

RepoType = Literal['model', 'dataset']

ASSETS_DIR = Path(__file__).resolve().parent / 'assets'
BUILTIN_MODELS = {'tiny-qwen3': ASSETS_DIR / 'tiny-qwen3'}
BUILTIN_DATASETS = {
    'self-cognition': ASSETS_DIR / 'datasets' / 'self-cognition.jsonl',
    'alpaca-mini': ASSETS_DIR / 'datasets' / 'alpaca-mini.jsonl',
}
# Seed of the embedded model's random initialisation; part of the cache key with the file contents.
BUILTIN_MODEL_SEED = 20260101
_SCHEMES = ('ms://', 'hf://', 'builtin://')


class HubError(ValueError):
    pass


def split_id(model_or_dataset_id: str) -> tuple[Optional[str], str]:
    """``'hf://Qwen/Qwen3-0.6B'`` -> ``('hf', 'Qwen/Qwen3-0.6B')``; a plain path -> ``(None, path)``."""
    for scheme in _SCHEMES:
        if model_or_dataset_id.startswith(scheme):
            return scheme[:-3], model_or_dataset_id[len(scheme):]
    return None, model_or_dataset_id


def resolve(model_or_dataset_id: str, repo_type: RepoType = 'model', revision: Optional[str] = None) -> str:
    """Return a local path for an id; downloads (or reads the hub cache) where the id names a hub."""
    if not isinstance(model_or_dataset_id, (str, os.PathLike)):
        raise HubError(f'expected a model or dataset id string, got {type(model_or_dataset_id).__name__}')
    scheme, name = split_id(os.fspath(model_or_dataset_id))
    if scheme == 'builtin':
        return _resolve_builtin(name)
    if scheme == 'hf':
        return _resolve_hf(name, repo_type, revision)
    if scheme == 'ms':
        return _resolve_ms(name, repo_type, revision)
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    raise HubError(f'{model_or_dataset_id!r} is neither an existing local path nor a hub id. Use '
                   f"'hf://org/name' (Hugging Face), 'ms://org/name' (ModelScope), "
                   f"'builtin://tiny-qwen3' / 'builtin://self-cognition' (embedded), or a local folder.")


def _resolve_hf(name: str, repo_type: RepoType, revision: Optional[str]) -> str:
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id=name, repo_type=repo_type, revision=revision)
    except Exception as exc:  # the hub raises many types; one message says what to do
        offline = os.environ.get('HF_HUB_OFFLINE', '0') not in ('0', '', 'false', 'False')
        hint = (' HF_HUB_OFFLINE is set, so only the local cache is read: download it once where the hub '
                'is reachable, or point to a local folder.' if offline else
                ' Check the id, your network and HF_TOKEN for gated repos.')
        raise HubError(f'could not resolve hf://{name} ({repo_type}): {exc}.{hint}') from exc


def _resolve_ms(name: str, repo_type: RepoType, revision: Optional[str]) -> str:
    try:
        from modelscope import snapshot_download
    except ImportError as exc:
        raise HubError(f"ms://{name} needs the 'modelscope' package: pip install 'twinkle[modelscope]' "
                       f"(or use an hf:// id or a local folder).") from exc
    try:
        return snapshot_download(name, repo_type=repo_type, revision=revision)
    except Exception as exc:
        raise HubError(f'could not resolve ms://{name} ({repo_type}): {exc}') from exc


def _resolve_builtin(name: str) -> str:
    if name in BUILTIN_DATASETS:
        return str(BUILTIN_DATASETS[name])
    if name in BUILTIN_MODELS:
        return str(materialize_builtin_model(name))
    known = ', '.join(f'builtin://{k}' for k in [*BUILTIN_MODELS, *BUILTIN_DATASETS])
    raise HubError(f'unknown embedded id builtin://{name}; available: {known}')


def _fingerprint(src: Path) -> str:
    digest = hashlib.sha256(str(BUILTIN_MODEL_SEED).encode())
    for f in sorted(src.iterdir()):
        if f.is_file():
            digest.update(f.name.encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def materialize_builtin_model(name: str = 'tiny-qwen3') -> Path:
    """Build the embedded model's weights once (seeded) and return its folder in the cache.

    The folder holds the shipped config and tokenizer plus ``model.safetensors``, so plain
    ``AutoModelForCausalLM.from_pretrained(folder)`` loads it. Concurrent callers (several ranks on
    one machine) wait on a file lock; the folder appears atomically by rename.
    """
    from filelock import FileLock

    src = BUILTIN_MODELS[name]
    if not (src / 'config.json').exists():
        raise HubError(f'the embedded model files are missing from {src}; reinstall twinkle')
    root = get_settings().cache_dir / 'models'
    root.mkdir(parents=True, exist_ok=True)
    target = root / f'{name}-{_fingerprint(src)}'
    if (target / 'model.safetensors').exists():
        return target
    with FileLock(str(root / f'{target.name}.lock')):
        if (target / 'model.safetensors').exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f'.{target.name}-', dir=root))
        try:
            for f in src.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
            _write_seeded_weights(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_seeded_weights(folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    # fork_rng keeps the caller's RNG stream untouched: materialising must not shift a training run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILTIN_MODEL_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Whichever process holds the cache lock writes the folder, whatever its rank: transformers' own rule
    # (only rank 0 of an initialised process group writes) would leave it without weights when another rank
    # wins the lock.
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(folder, safe_serialization=True)
    meta = {'seed': BUILTIN_MODEL_SEED, 'torch': torch.__version__}
    (folder / 'twinkle_builtin.json').write_text(json.dumps(meta, indent=2))
