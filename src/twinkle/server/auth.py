"""API keys: kept only as salted sha256 hashes; a key's hash names its tenant.

The salt is created once per data directory, so the same key maps to the same tenant (and its runs
and checkpoints) after a restart.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional

from .errors import Unauthorized

SALT_FILE = 'server.json'


def load_salt(data_dir: Path) -> bytes:
    path = data_dir / SALT_FILE
    if path.exists():
        return bytes.fromhex(json.loads(path.read_text())['key_salt'])
    salt = secrets.token_bytes(16)
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps({'key_salt': salt.hex()}))
    os.replace(tmp, path)
    return salt


def hash_key(salt: bytes, key: str) -> str:
    return hashlib.sha256(salt + key.encode('utf-8')).hexdigest()


class KeyRing:
    """Maps presented API keys to tenant ids without keeping the keys themselves."""

    def __init__(self, salt: bytes, keys: Iterable[str]) -> None:
        self._salt = salt
        self._tenants: Dict[str, str] = {}
        for key in keys:
            digest = hash_key(salt, key)
            self._tenants[digest] = 't' + digest[:16]

    def __len__(self) -> int:
        return len(self._tenants)

    def tenant_of(self, key: Optional[str]) -> str:
        if not key:
            raise Unauthorized('missing API key: send it in the X-API-Key header (or Authorization: Bearer <key>)')
        digest = hash_key(self._salt, key)
        for known, tenant in self._tenants.items():
            if hmac.compare_digest(known, digest):
                return tenant
        raise Unauthorized('unknown API key')


def key_from_headers(headers: Mapping[str, str]) -> Optional[str]:
    key = headers.get('x-api-key')
    if key:
        return key.strip()
    auth = headers.get('authorization', '')
    if auth.lower().startswith('bearer '):
        return auth[7:].strip()
    return None
