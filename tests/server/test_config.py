"""Server settings: flags, TWINKLE_SERVER_* environment variables and a YAML file, merged by pydantic-settings."""
from __future__ import annotations

import pytest

from twinkle.server.config import ConfigError, ServerSettings, load_settings

KEY_FILE, KEY_ENV, KEY_FLAG = 'tml-from-file-0123', 'tml-from-env-0123', 'tml-from-flag-0123'


@pytest.fixture
def config(tmp_path, monkeypatch):
    for name in ('TWINKLE_SERVER_API_KEYS', 'TWINKLE_SERVER_PORT', 'TWINKLE_SERVER_LIMITS__REQUESTS_PER_MINUTE'):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / 'server.yaml'
    path.write_text(f"api_keys: ['{KEY_FILE}']\nport: 9000\nhost: 0.0.0.0\n"
                    f"limits:\n  max_adapters_per_tenant: 2\n  requests_per_minute: 40\n")
    return path


def test_flags_over_environment_over_file(config, monkeypatch):
    monkeypatch.setenv('TWINKLE_SERVER_PORT', '9100')
    monkeypatch.setenv('TWINKLE_SERVER_LIMITS__REQUESTS_PER_MINUTE', '77')
    s = load_settings(str(config), port=None, log_level='debug')
    assert (s.port, s.host, s.log_level) == (9100, '0.0.0.0', 'debug')
    # Nested values merge field by field: the file's adapter limit stays, the environment's rate wins.
    assert (s.limits.max_adapters_per_tenant, s.limits.requests_per_minute) == (2, 77)
    assert load_settings(str(config), port=9200).port == 9200


def test_api_keys_of_every_source_count(config, monkeypatch):
    monkeypatch.setenv('TWINKLE_SERVER_API_KEYS', f'{KEY_ENV}, tml-second-env-0123')
    s = load_settings(str(config), api_keys=[KEY_FLAG])
    assert [k.get_secret_value() for k in s.api_keys] == [KEY_FLAG, KEY_ENV, 'tml-second-env-0123', KEY_FILE]
    monkeypatch.setenv('TWINKLE_SERVER_API_KEYS', 'short')
    with pytest.raises(ConfigError, match=r'api_keys\[0\] is shorter than 8'):
        load_settings()


def test_settings_built_directly_read_the_environment(monkeypatch):
    monkeypatch.setenv('TWINKLE_SERVER_LIMITS__MAX_NEW_TOKENS', '12')
    monkeypatch.delenv('TWINKLE_SERVER_API_KEYS', raising=False)
    s = ServerSettings(api_keys=[KEY_FLAG], limits={'max_tokens_per_request': 64})
    assert (s.limits.max_new_tokens, s.limits.max_tokens_per_request) == (12, 64)


@pytest.mark.parametrize('text, message', [
    ('- 1\n- 2\n', 'must be a mapping of options'),
    ('limits: [\n', 'is not valid YAML'),
    ('limits:\n  typo_limit: 3\n', 'limits.typo_limit: Extra inputs are not permitted'),
    ('port: -1\n', 'port: Input should be greater than or equal to 0'),
])
def test_bad_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / 'bad.yaml'
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_settings(str(path))
    assert str(path) in str(err.value)
    with pytest.raises(ConfigError, match='does not exist'):
        load_settings(str(tmp_path / 'missing.yaml'))


def test_mesh_from_flag_environment_and_file(tmp_path, monkeypatch):
    monkeypatch.delenv('TWINKLE_SERVER_MESH', raising=False)
    assert load_settings().mesh is None
    assert load_settings(mesh='fsdp=2').mesh == {'fsdp': 2}
    assert load_settings(mesh=' fsdp = 4 ').mesh == {'fsdp': 4}
    path = tmp_path / 'server.yaml'
    path.write_text('mesh:\n  fsdp: 2\n')
    assert load_settings(str(path)).mesh == {'fsdp': 2}
    monkeypatch.setenv('TWINKLE_SERVER_MESH', 'fsdp=3')
    assert load_settings(str(path)).mesh == {'fsdp': 3}  # the environment over the file
    assert load_settings(str(path), mesh='fsdp=2').mesh == {'fsdp': 2}  # the flag over both
    # Tensor parallelism, alone or with FSDP2 (ranks: fsdp x tp).
    assert load_settings(mesh='tp=2').mesh == {'tp': 2}
    assert load_settings(mesh='fsdp=2, tp=2').mesh == {'fsdp': 2, 'tp': 2}
    path.write_text('mesh:\n  fsdp: 2\n  tp: 4\n')
    monkeypatch.delenv('TWINKLE_SERVER_MESH')
    assert load_settings(str(path)).mesh == {'fsdp': 2, 'tp': 4}
    monkeypatch.setenv('TWINKLE_SERVER_MESH', 'tp=2')
    assert load_settings(str(path)).mesh == {'tp': 2}


@pytest.mark.parametrize('mesh, message', [
    ('fsdp', r'name=size\[,name=size\], e\.g\. fsdp=2'),
    ('fsdp=two', r"mesh size of 'fsdp' must be a positive integer, got 'two'"),
    ('fsdp=0', r"mesh size of 'fsdp' must be a positive integer"),
    ('ep=2', r"mesh axis 'ep' is not supported by the served model; use one of \['fsdp', 'tp'\]"),
    ('fsdp=2,pp=2', r"mesh axis 'pp' is not supported by the served model"),
    ('tp=0', r"mesh size of 'tp' must be a positive integer"),
    ({'fsdp': 2, 'tp': 'x'}, r"mesh size of 'tp' must be a positive integer, got 'x'"),
    ('tp=2,tp=4', r"names the axis 'tp' twice"),
    ({'fsdp': 1.5}, r"mesh size of 'fsdp' must be a positive integer, got 1\.5"),
    ({'fsdp': True}, r"mesh size of 'fsdp' must be a positive integer"),
    (['fsdp', 2], r'mesh must be a mapping of axis to size'),
])
def test_bad_mesh_names_the_problem(mesh, message, monkeypatch):
    monkeypatch.delenv('TWINKLE_SERVER_MESH', raising=False)
    with pytest.raises(ConfigError, match=message):
        load_settings(mesh=mesh)


def test_cli_passes_mesh_to_the_settings(monkeypatch, capsys):
    from twinkle import cli
    monkeypatch.delenv('TWINKLE_SERVER_MESH', raising=False)
    served = []
    monkeypatch.setattr('twinkle.server.app.serve', served.append)
    assert cli.main(['serve', '--api-key', 'tml-cli-key-0123', '--mesh', 'fsdp=2']) in (0, None)
    assert served[0].mesh == {'fsdp': 2}
    assert cli.main(['serve', '--api-key', 'tml-cli-key-0123', '--mesh', 'fsdp=2,tp=2']) in (0, None)
    assert served[1].mesh == {'fsdp': 2, 'tp': 2}
    assert cli.main(['serve', '--api-key', 'tml-cli-key-0123', '--mesh', 'dp=x']) == 2
    assert "mesh axis 'dp' is not supported" in capsys.readouterr().err


def test_compute_threads_leave_the_event_loop_a_core_unless_set(monkeypatch):
    import os

    from twinkle.server.app import compute_threads
    settings = ServerSettings(api_keys=['tml-threads-0123456789'])
    monkeypatch.setenv('OMP_NUM_THREADS', '3')
    assert compute_threads(settings) == 3
    monkeypatch.delenv('OMP_NUM_THREADS')
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    assert compute_threads(settings) == max(1, cores - 1)
    assert compute_threads(ServerSettings(api_keys=['tml-threads-0123456789'], compute_threads=5)) == 5
