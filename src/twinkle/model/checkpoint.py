"""Atomic checkpoints: write into a temporary folder, add a manifest, then rename.

A folder counts as a checkpoint only if ``twinkle_manifest.json`` is present and every file it lists
has the recorded size (the sha256 is there to check by hand or with ``verify(deep=True)``). A crash
mid-write leaves a hidden temporary folder, never a half checkpoint under the final name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from .adapter_state import AdapterState

MANIFEST = 'twinkle_manifest.json'
TRAINER_STATE = 'trainer_state.json'
# File names inside a checkpoint folder, shared by every backend.
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
RNG_FILE = 'rng_state.pt'
SCHEDULER_FILE = 'scheduler.pt'
SCALER_FILE = 'scaler.pt'
MANIFEST_VERSION = 1


class CheckpointError(ValueError):
    pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, kind: str, extra: Optional[Dict[str, Any]] = None) -> None:
    files = {}
    for path in sorted(p for p in folder.rglob('*') if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {'size': path.stat().st_size, 'sha256': _sha256(path)}
    manifest = {'version': MANIFEST_VERSION, 'kind': kind, 'files': files, **(extra or {})}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def read_manifest(folder: Union[str, Path]) -> Dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f'checkpoint folder {folder} does not exist')
    path = folder / MANIFEST
    if not path.exists():
        raise CheckpointError(f'{folder} is not a complete Twinkle checkpoint: {MANIFEST} is missing (the save '
                              f'was interrupted, or the folder was not written by model.save). Use another '
                              f'checkpoint, or load plain weights with TransformersModel(model_id=...)')
    return json.loads(path.read_text())


def verify(folder: Union[str, Path], deep: bool = False) -> Dict[str, Any]:
    folder = Path(folder)
    manifest = read_manifest(folder)
    for rel, info in manifest['files'].items():
        path = folder / rel
        if not path.exists() or path.stat().st_size != info['size']:
            raise CheckpointError(f'checkpoint {folder} is incomplete: {rel} is missing or has the wrong size')
        if deep and _sha256(path) != info['sha256']:
            raise CheckpointError(f'checkpoint {folder} is corrupt: {rel} does not match its sha256')
    return manifest


@contextlib.contextmanager
def atomic_folder(target: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it replaces ``target`` by rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{target.name}.tmp-', dir=target.parent))
    try:
        yield tmp
        if target.exists():
            # Keep the old checkpoint until the new one is in place: rename it aside first.
            old = target.with_name(f'.{target.name}.old-{os.getpid()}')
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except OSError:
                os.replace(old, target)  # the previous checkpoint stays under its name
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def capture_rng_state() -> Dict[str, Any]:
    state = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def write_json(path: Path, data: Dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def open_for_resume(folder: Union[str, Path], session: Any) -> tuple:
    """Check ``folder`` is a complete checkpoint of the session's kind; return (trainer_state, progress).

    ``progress`` is what ``resume_from_checkpoint`` returns; ``trainer_state`` is empty for a
    weights-only checkpoint.
    """
    folder = Path(folder)
    manifest = verify(folder)
    kind = 'adapter' if session.name else 'full'
    if manifest.get('kind') != kind:
        raise CheckpointError(f'{folder} is a {manifest.get("kind")} checkpoint but this model trains '
                              f'{"adapter " + repr(session.name) if session.name else "all parameters"}')
    state_path = folder / TRAINER_STATE
    trainer_state = json.loads(state_path.read_text()) if state_path.exists() else {}
    progress = {
        'cur_step': int(trainer_state.get('cur_step', 0)),
        'consumed_train_samples': int(trainer_state.get('consumed_train_samples', 0)),
        'gradient_accumulation_steps': int(trainer_state.get('gradient_accumulation_steps',
                                                             session.gradient_accumulation_steps)),
    }
    return trainer_state, progress


def restore_training_state(folder: Union[str, Path], session: Any, trainer_state: Dict[str, Any],
                           progress: Dict[str, int], rank: int) -> None:
    """Scheduler, loss scaler, this rank's RNG stream and the session's counters (the optimizer state is
    the backend's business). More ranks than were saved reuse the saved streams in turn."""
    folder = Path(folder)
    if session.scheduler is not None and (folder / SCHEDULER_FILE).exists():
        session.scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, weights_only=False))
    if session.scaler is not None and (folder / SCALER_FILE).exists():
        session.scaler.load_state_dict(torch.load(folder / SCALER_FILE, weights_only=False))
    rng_states = torch.load(folder / RNG_FILE, weights_only=False)
    restore_rng_state(rng_states[rank % len(rng_states)])
    session.optimizer_step = progress['cur_step']
    session.micro_step = int(trainer_state.get('micro_step', 0))
    session.gradient_accumulation_steps = progress['gradient_accumulation_steps']
    session.start_window()


def read_trainer_state(folder: Union[str, Path]) -> Dict[str, Any]:
    path = Path(folder) / TRAINER_STATE
    if not path.exists():
        raise CheckpointError(f'{folder} holds weights only ({TRAINER_STATE} is missing): it was saved without '
                              f'save_optimizer=True. Resume with resume_only_model=True, or save with '
                              f'save_optimizer=True next time')
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------- where checkpoints are
def checkpoint_path(name: str, output_dir: Optional[str], default_dir: Path) -> Path:
    """``name`` under ``output_dir`` (the model's output folder by default); a path given as ``name``
    with no ``output_dir`` is taken as it is."""
    path = Path(name)
    if output_dir is None and (path.is_absolute() or len(path.parts) > 1):
        return path
    return Path(output_dir or default_dir) / name


def weights_folder(checkpoint_dir: Union[str, Path], session: 'AdapterState') -> Path:
    """The local folder of ``checkpoint_dir`` (hub addresses resolved), checked to hold an adapter's
    weights when the session trains one."""
    from ..hub import resolve
    folder = Path(resolve(str(checkpoint_dir)))
    if session.name is not None and not (folder / ADAPTER_WEIGHTS).exists():
        raise CheckpointError(f'{folder} has no {ADAPTER_WEIGHTS}: it is not an adapter checkpoint '
                              f'(a full-model folder is loaded as the base model: model_id=...)')
    return folder
