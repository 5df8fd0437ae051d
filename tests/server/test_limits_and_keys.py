"""The README's server limits that no other test reaches (``max_lora_rank``, ``max_new_tokens``,
``max_objects_per_tenant``) and its promise that API keys are stored only as salted hashes."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest

from twinkle.client import LoraConfig, RemoteError, TransformersModel, TwinkleClient
from twinkle.server.auth import SALT_FILE, hash_key
from twinkle.server.testing import ThreadServer

MODEL = 'builtin://tiny-qwen3'
KEY = 'tml-limits-tenant-0123456789'
pytestmark = pytest.mark.slow  # a server in a thread of this process
LIMITS = {'max_lora_rank': 8, 'max_new_tokens': 4, 'max_objects_per_tenant': 2}


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    srv = ThreadServer(str(tmp_path_factory.mktemp('limits-data')), [KEY], model=MODEL, limits=LIMITS)
    yield srv
    srv.stop()


def test_lora_rank_above_the_limit_is_refused(server):
    with TwinkleClient(server.url, KEY) as client:
        model = TransformersModel(model_id=MODEL, client=client)
        with pytest.raises(RemoteError) as err:
            model.add_adapter_to_model('wide', LoraConfig(r=16, target_modules=['q_proj']))
        assert err.value.status == 400 and 'r=16' in err.value.detail and '1..8' in err.value.detail
        model.add_adapter_to_model('at_limit', LoraConfig(r=8, target_modules=['q_proj']))  # the limit itself is fine
        model.release()


def test_max_new_tokens_above_the_limit_is_refused(server):
    with TwinkleClient(server.url, KEY) as client:
        model = TransformersModel(model_id=MODEL, client=client)
        model.add_adapter_to_model('default', LoraConfig(r=4, target_modules=['q_proj']))
        prompt = [[5, 6, 7, 8]]
        with pytest.raises(RemoteError) as err:
            model.generate(prompt, max_new_tokens=5, do_sample=False)
        assert err.value.status == 413 and 'limits.max_new_tokens' in err.value.detail
        out = model.generate(prompt, max_new_tokens=4, do_sample=False)
        assert len(out) == 1 and 1 <= len(out[0]['token_ids']) <= 4
        model.release()


def test_objects_per_tenant_are_capped_until_one_is_released(server):
    with TwinkleClient(server.url, KEY) as client:
        first = TransformersModel(model_id=MODEL, client=client)
        second = TransformersModel(model_id=MODEL, client=client)
        with pytest.raises(RemoteError) as err:
            TransformersModel(model_id=MODEL, client=client)
        assert err.value.status == 429 and 'max_objects_per_tenant' in err.value.detail
        # Only a release lifts the cap, so the server tells clients not to wait and retry.
        raw = httpx.post(f'{server.url}/api/v1/twinkle/objects', headers={'X-API-Key': KEY},
                         json={'class_name': 'TransformersModel', 'args': [], 'kwargs': {'model_id': MODEL}})
        assert raw.status_code == 429 and raw.headers.get('x-should-retry') == 'false'
        first.release()
        third = TransformersModel(model_id=MODEL, client=client)  # room again
        second.release()
        third.release()


def test_keys_are_stored_only_as_salted_hashes(server, tmp_path):
    data_dir = Path(server.ctx.data_dir)
    with TwinkleClient(server.url, KEY) as client:
        model = TransformersModel(model_id=MODEL, client=client)
        model.add_adapter_to_model('default', LoraConfig(r=4, target_modules=['q_proj']))
        model.save('ckpt')  # make the server write its per-tenant files
        model.release()
    salt = bytes.fromhex(json.loads((data_dir / SALT_FILE).read_text())['key_salt'])
    assert len(salt) == 16
    tenant = server.ctx.keys.tenant_of(KEY)
    assert tenant == 't' + hashlib.sha256(salt + KEY.encode()).hexdigest()[:16] == 't' + hash_key(salt, KEY)[:16]
    # Neither the key nor its unsalted hash is written anywhere under the data directory.
    unsalted = hashlib.sha256(KEY.encode()).hexdigest()
    files = [p for p in data_dir.rglob('*')]
    assert any(tenant in str(p) for p in files)
    for path in files:
        assert KEY not in str(path) and unsalted[:16] not in str(path)
        if path.is_file():
            content = path.read_bytes()
            assert KEY.encode() not in content and unsalted[:16].encode() not in content, path
    # Another data directory draws another salt: the same key is another tenant id there.
    other = ThreadServer(str(tmp_path / 'other-data'), [KEY], model=MODEL)
    try:
        assert other.ctx.keys.tenant_of(KEY) != tenant
    finally:
        other.stop()
