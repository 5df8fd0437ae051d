"""Per-tenant registry of training runs and checkpoints, persisted under the data directory.

Layout: ``<data_dir>/tenants/<tenant>/runs/<digest of the run id>.json`` (a run and its checkpoints) and
``.../checkpoints/<checkpoint id>/``. Clients name checkpoints ``twinkle://<run>/<kind>/<name>`` (or
``tinker://...``); the folder is always the server-generated id, never a string a client chose.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .errors import ApiError, BadRequest, NotFound

SCHEMES = ('twinkle://', 'tinker://')
KINDS = ('weights', 'sampler_weights')
_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$')
_RUN = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._:\-]{0,200}$')


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def check_name(name: Any, what: str = 'checkpoint name') -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise BadRequest(f'{what} {name!r} is not valid: use 1-128 letters, digits, ".", "_" or "-", starting with '
                         f'a letter or digit')
    return name


def parse_path(path: Any) -> Tuple[str, str, str]:
    """``'tinker://run/weights/name'`` -> ``('run', 'weights', 'name')``; anything else is a 400."""
    if not isinstance(path, str) or not path.startswith(SCHEMES):
        raise BadRequest(f'checkpoint path {path!r} must look like twinkle://<run>/weights/<name> or '
                         f'tinker://<run>/sampler_weights/<name> (server paths are not accepted)')
    rest = path.split('://', 1)[1]
    parts = rest.split('/')
    if len(parts) != 3 or parts[1] not in KINDS or not _RUN.match(parts[0]):
        raise BadRequest(f'checkpoint path {path!r} must have the form <scheme>://<run>/<kind>/<name> with kind one '
                         f'of {KINDS}')
    return parts[0], parts[1], check_name(parts[2])


def format_path(run_id: str, kind: str, name: str, scheme: str = 'tinker') -> str:
    return f'{scheme}://{run_id}/{kind}/{name}'


MAX_SNAPSHOTS_PER_RUN = 8


class TenantStore:
    """Runs and checkpoints of one tenant; thread-safe. Each run (with its checkpoints) is one small file,
    written atomically after each change to that run, so a change never rewrites the whole registry."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs_dir = root / 'runs'
        self._lock = threading.RLock()
        self.runs: Dict[str, Dict[str, Any]] = {}
        self.checkpoints: Dict[str, Dict[str, Any]] = {}
        legacy = root / 'registry.json'
        if legacy.exists():  # the single-file layout of earlier versions
            data = json.loads(legacy.read_text())
            self.runs = data.get('runs', {})
            self.checkpoints = data.get('checkpoints', {})
        if self.runs_dir.is_dir():
            for f in sorted(self.runs_dir.glob('*.json')):
                data = json.loads(f.read_text())
                if data.get('run') is not None:
                    self.runs[data['run']['run_id']] = data['run']
                self.checkpoints.update(data.get('checkpoints', {}))
        if legacy.exists():
            for run_id in {*self.runs, *(c['run_id'] for c in self.checkpoints.values())}:
                self._save(run_id)
            legacy.unlink()

    def _run_file(self, run_id: str) -> Path:
        # Run ids hold characters (':') some file systems refuse: name the file by a digest.
        return self.runs_dir / f'{hashlib.sha256(run_id.encode()).hexdigest()[:32]}.json'

    def _save(self, run_id: str) -> None:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        data = {'run': self.runs.get(run_id),
                'checkpoints': {k: c for k, c in self.checkpoints.items() if c['run_id'] == run_id}}
        target = self._run_file(run_id)
        tmp = self.runs_dir / f'.run-{uuid.uuid4().hex}.tmp'
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, target)

    # -- runs ----------------------------------------------------------------------------------------------
    def add_run(self, run_id: str, record: Dict[str, Any]) -> Dict[str, Any]:
        with self._lock:
            record = {'run_id': run_id, 'created': now_iso(), 'last_request_time': now_iso(), **record}
            self.runs[run_id] = record
            self._save(run_id)
            return record

    def check_run_room(self, limit: int) -> None:
        with self._lock:
            stored = len(self.runs)
        if stored >= limit:
            raise ApiError(f'this API key stores {stored} training runs (limits.max_runs_per_tenant is {limit}); '
                           f'delete finished ones (TwinkleClient.delete_run) first', 429,
                           headers={'x-should-retry': 'false'})

    def delete_run(self, run_id: str) -> int:
        """Forget a run and delete its checkpoints; returns how many checkpoints went."""
        with self._lock:
            if self.runs.pop(run_id, None) is None:
                raise NotFound(f'training run {run_id!r} not found')
            gone = [c for c in self.checkpoints.values() if c['run_id'] == run_id]
            for c in gone:
                del self.checkpoints[c['checkpoint_id']]
            self._run_file(run_id).unlink(missing_ok=True)
        for c in gone:
            shutil.rmtree(self.folder(c), ignore_errors=True)
        return len(gone)

    def get_run(self, run_id: str) -> Dict[str, Any]:
        with self._lock:
            run = self.runs.get(run_id)
        if run is None:
            raise NotFound(f'training run {run_id!r} not found')
        return run

    def touch_run(self, run_id: str) -> None:
        with self._lock:
            if run_id in self.runs:
                self.runs[run_id]['last_request_time'] = now_iso()

    def list_runs(self) -> List[Dict[str, Any]]:
        with self._lock:
            return sorted(self.runs.values(), key=lambda r: r['created'])

    # -- checkpoints ---------------------------------------------------------------------------------------
    def find(self, run_id: str, kind: str, name: str) -> Optional[Dict[str, Any]]:
        with self._lock:
            for ckpt in self.checkpoints.values():
                if ckpt['run_id'] == run_id and ckpt['kind'] == kind and ckpt['name'] == name:
                    return ckpt
        return None

    def resolve(self, path: str) -> Dict[str, Any]:
        run_id, kind, name = parse_path(path)
        ckpt = self.find(run_id, kind, name)
        if ckpt is None:
            raise NotFound(f'checkpoint {path} not found')
        return ckpt

    def new_checkpoint_dir(self) -> Tuple[str, Path]:
        ckpt_id = uuid.uuid4().hex
        return ckpt_id, self.root / 'checkpoints' / ckpt_id

    def add_checkpoint(self, ckpt_id: str, run_id: str, kind: str, name: str, folder: Path,
                       extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        size = sum(f.stat().st_size for f in folder.rglob('*') if f.is_file())
        with self._lock:
            old = self.find(run_id, kind, name)
            record = {'checkpoint_id': ckpt_id, 'run_id': run_id, 'kind': kind, 'name': name, 'time': now_iso(),
                      'size_bytes': size, **(extra or {})}
            self.checkpoints[ckpt_id] = record
            if old is not None:
                self.checkpoints.pop(old['checkpoint_id'], None)
            stale = [old] if old is not None else []
            if kind != 'snapshot':
                run = self.runs.get(run_id)
                if run is not None:
                    run['last_checkpoint' if kind == 'weights' else 'last_sampler_checkpoint'] = ckpt_id
            else:
                # Sampling snapshots are made on every RL step: keep the newest few per run so disk and the
                # registry stay bounded (an older sampling client then gets a clear 404).
                snaps = sorted((c for c in self.checkpoints.values()
                                if c['kind'] == 'snapshot' and c['run_id'] == run_id), key=lambda c: c['time'])
                for c in snaps[:-MAX_SNAPSHOTS_PER_RUN]:
                    self.checkpoints.pop(c['checkpoint_id'], None)
                    stale.append(c)
            self._save(run_id)
        for c in stale:
            shutil.rmtree(self.folder(c), ignore_errors=True)
        return record

    def check_room(self, limit: int, run_id: str, kind: str, name: str) -> None:
        """Refuse a new named checkpoint beyond ``limit`` (replacing one of the same name is always fine)."""
        if kind not in KINDS or self.find(run_id, kind, name) is not None:
            return
        with self._lock:
            stored = sum(1 for c in self.checkpoints.values() if c['kind'] in KINDS)
        if stored >= limit:
            raise ApiError(f'this API key stores {stored} checkpoints (limits.max_checkpoints_per_tenant is {limit}); '
                           f'delete some (RestClient.delete_checkpoint, or DELETE /api/v1/twinkle/checkpoints) '
                           f'first', 429, headers={'x-should-retry': 'false'})

    def folder(self, ckpt: Dict[str, Any]) -> Path:
        return self.root / 'checkpoints' / ckpt['checkpoint_id']

    def delete_checkpoint(self, ckpt: Dict[str, Any]) -> None:
        with self._lock:
            self.checkpoints.pop(ckpt['checkpoint_id'], None)
            self._save(ckpt['run_id'])
        shutil.rmtree(self.folder(ckpt), ignore_errors=True)

    def list_checkpoints(self, run_id: Optional[str] = None) -> List[Dict[str, Any]]:
        with self._lock:
            out = [c for c in self.checkpoints.values() if c['kind'] in KINDS
                   and (run_id is None or c['run_id'] == run_id)]
        return sorted(out, key=lambda c: c['time'])


    def clean_interrupted(self) -> List[str]:
        """Remove what saves cut short by a crash left behind (temporary folders and files, finished folders
        the registry never recorded); only when no save is running (at start). Returns the removed names."""
        removed: List[str] = []
        for tmp in [*self.root.glob('.registry-*.tmp'), *self.runs_dir.glob('.run-*.tmp')]:
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
        folder = self.root / 'checkpoints'
        if not folder.is_dir():
            return removed
        with self._lock:
            known = set(self.checkpoints)
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith('.') and '.old-' in entry.name:
                # A replaced folder renamed aside: if the new one never arrived, it is the checkpoint itself.
                original = folder / entry.name[1:].split('.old-', 1)[0]
                if not original.exists() and original.name in known:
                    os.replace(entry, original)
                    continue
            if entry.name in known:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
        return removed


class Store:
    """All tenants' registries under one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._tenants: Dict[str, TenantStore] = {}
        self._lock = threading.Lock()

    def clean_interrupted(self) -> int:
        """Clean every tenant's leftovers of interrupted saves (see TenantStore.clean_interrupted)."""
        tenants = self.data_dir / 'tenants'
        if not tenants.is_dir():
            return 0
        return sum(len(self.tenant(t.name).clean_interrupted()) for t in tenants.iterdir() if t.is_dir())

    def tenant(self, tenant_id: str) -> TenantStore:
        with self._lock:
            store = self._tenants.get(tenant_id)
            if store is None:
                store = self._tenants[tenant_id] = TenantStore(self.data_dir / 'tenants' / tenant_id)
            return store
