"""``twinkle serve`` as a process: YAML limits, 429 / 413 answers, and runs and checkpoints that survive a
restart on the same data directory."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch

from twinkle.client import LoraConfig, RemoteError, TransformersModel, TwinkleClient

from .conftest import KEY_A, KEY_B, KEY_C, MODEL

tinker = pytest.importorskip('tinker')
from tinker import types  # noqa: E402

pytestmark = pytest.mark.slow

CONFIG = f"""
model: {MODEL}
api_keys: ['{KEY_B}']
limits:
  max_adapters_per_tenant: 2
  max_tokens_per_request: 200
  requests_per_minute: 40
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class CliServer:

    def __init__(self, data_dir, config_file, log_file) -> None:
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        cmd = [sys.executable, '-m', 'twinkle.cli', 'serve', '--config', str(config_file), '--port', str(self.port),
               '--data-dir', str(data_dir), '--api-key', KEY_A, '--api-key', KEY_C, '--log-level', 'warning']
        self.log = open(log_file, 'ab')
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ})
        deadline = time.monotonic() + 300
        while True:
            assert self.proc.poll() is None, f'twinkle serve exited; see {log_file}'
            try:
                if httpx.get(f'{self.url}/api/v1/healthz', timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, 'twinkle serve did not become healthy'
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def datum(n: int) -> types.Datum:
    tokens = list(range(10, 10 + n))
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={'target_tokens': np.array(tokens[1:], dtype=np.int64)})


def test_cli_config_rejects_bad_values(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('limits:\n  max_adapters_per_tenant: 0\n  typo_limit: 3\n')
    out = subprocess.run([sys.executable, '-m', 'twinkle.cli', 'serve', '--config', str(bad), '--api-key', KEY_A],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert 'max_adapters_per_tenant' in out.stderr and 'typo_limit' in out.stderr
    out = subprocess.run([sys.executable, '-m', 'twinkle.cli', 'serve'], capture_output=True, text=True,
                         timeout=120, env={k: v for k, v in os.environ.items() if k != 'TWINKLE_SERVER_API_KEYS'})
    assert out.returncode == 2 and '--api-key' in out.stderr


def test_limits_and_restart(tmp_path):
    config = tmp_path / 'server.yaml'
    config.write_text(CONFIG)
    data_dir = tmp_path / 'data'
    srv = CliServer(data_dir, config, tmp_path / 'server.log')
    try:
        # Tinker run with a checkpoint.
        service = tinker.ServiceClient(base_url=srv.url, api_key=KEY_A)
        tc = service.create_lora_training_client(base_model=MODEL, rank=4, seed=0).result()
        tc.forward_backward([datum(20)], 'cross_entropy').result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        loss_at_save = tc.forward([datum(20)], 'cross_entropy').result().metrics['loss:sum']
        tinker_path = tc.save_state('before-restart').result().path
        # Native run with a checkpoint.
        client = TwinkleClient(srv.url, KEY_A)
        model = TransformersModel(model_id=MODEL, client=client)
        model.add_adapter_to_model('default', LoraConfig(r=4, target_modules=['q_proj']))
        native_state = model.get_state_dict()
        native_path = model.save('native-ckpt')

        # Limits: a third adapter (429), a request over the token limit (413), a burst over the rate (429).
        # The same tenant, without the client's polite 429 retries (eight waits of Retry-After each).
        with TwinkleClient(srv.url, KEY_A, max_429_retries=0) as once, pytest.raises(RemoteError) as err:
            TransformersModel(model_id=MODEL, client=once).add_adapter_to_model('x', LoraConfig(r=4))
        assert err.value.status == 429 and 'max_adapters_per_tenant' in err.value.detail
        with pytest.raises(RemoteError) as err:
            model.set_optimizer('AdamW', lr=1e-3)
            model.forward_backward(inputs=[{'input_ids': list(range(5, 305)), 'labels': list(range(5, 305))}])
        assert err.value.status == 413 and 'max_tokens_per_request' in err.value.detail
        with httpx.Client(base_url=srv.url, headers={'X-API-Key': KEY_C}) as c:
            codes = [c.post('/api/v1/twinkle/objects', json={'class_name': 'Nope'}).status_code for _ in range(45)]
            assert codes[:40] == [404] * 40 and codes[-1] == 429
            limited = c.post('/api/v1/twinkle/objects', json={'class_name': 'Nope'})
            assert 'requests_per_minute' in limited.json()['detail'] and int(limited.headers['Retry-After']) >= 1
        service.close('success')
        client.close()
    finally:
        srv.stop()

    srv = CliServer(data_dir, config, tmp_path / 'server.log')
    try:
        rest = tinker.RestClient(base_url=srv.url, api_key=KEY_A)
        assert tc.model_id in {r.training_run_id for r in rest.list_training_runs().result().training_runs}
        assert tinker_path in {c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints}
        service = tinker.ServiceClient(base_url=srv.url, api_key=KEY_A)
        resumed = service.create_training_client_from_state_with_optimizer(tinker_path).result()
        assert resumed.forward([datum(20)], 'cross_entropy').result().metrics['loss:sum'] == \
            pytest.approx(loss_at_save, rel=1e-6)
        service.close('success')
        with TwinkleClient(srv.url, KEY_A) as client:
            assert native_path in [c['path'] for c in client.list_checkpoints()]
            model = TransformersModel(model_id=MODEL, client=client)
            model.add_adapter_to_model('restored', native_path)
            restored = model.get_state_dict()
            assert all(torch.equal(native_state[k], restored[k]) for k in native_state)
        with TwinkleClient(srv.url, KEY_B) as other:   # the key from the YAML file: a tenant of its own
            assert other.list_checkpoints() == []
    finally:
        srv.stop()
