"""One base model served under several names (aliases), and the limits recipes run into, with the SDK."""
from __future__ import annotations

import pytest

from twinkle.cli import _parser
from twinkle.server.config import ConfigError, load_settings
from twinkle.server.testing import ThreadServer

tinker = pytest.importorskip('tinker')
from tinker import types  # noqa: E402

KEY = 'tml-alias-tests-0123456789'
NAME, ALIAS = 'Qwen/Qwen3.5-9B-Base', 'Qwen/Qwen3-8B'


def test_cli_aliases_and_limit_options_reach_the_settings(tmp_path):
    args = _parser().parse_args(['serve', '--model-name', NAME, '--model-alias', ALIAS, '--model-alias', 'x/y',
                                 '--max-new-tokens', '4096', '--max-tokens-per-request', '9000'])
    config = tmp_path / 'server.yaml'
    config.write_text('model_aliases: [from/file]\nlimits:\n  max_new_tokens: 100\n  max_lora_rank: 16\n')
    settings = load_settings(str(config), model_name=args.model_name, model_aliases=args.model_aliases,
                             max_new_tokens=args.max_new_tokens, max_tokens_per_request=args.max_tokens_per_request)
    assert settings.served_names == [NAME, ALIAS, 'x/y', 'from/file', 'builtin://tiny-qwen3']  # flags, then file
    # the command line wins over the file; other limits of the file stay
    assert settings.limits.max_new_tokens == 4096 and settings.limits.max_tokens_per_request == 9000
    assert settings.limits.max_lora_rank == 16
    assert load_settings().limits.max_new_tokens >= 8192  # what recipes ask by default fits


def test_empty_alias_is_refused_with_the_option_name():
    with pytest.raises(ConfigError, match='model_aliases'):
        load_settings(model_aliases=[' '])


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    srv = ThreadServer(str(tmp_path_factory.mktemp('alias-data')), [KEY], model_name=NAME, model_aliases=[ALIAS],
                       long_poll_s=5.0, limits={'max_new_tokens': 8})
    yield srv
    srv.stop()


@pytest.fixture(scope='module')
def service(server):
    client = tinker.ServiceClient(base_url=server.url, api_key=KEY)
    yield client
    client.close('success')


def test_capabilities_list_every_name(server):
    rest = tinker.RestClient(base_url=server.url, api_key=KEY)
    names = [m.model_name for m in rest.get_server_capabilities().result().supported_models]
    assert names == [NAME, ALIAS]


def test_a_run_created_under_an_alias_reports_that_name(service):
    for name in (NAME, ALIAS):
        tc = service.create_lora_training_client(base_model=name, rank=4, seed=0).result()
        info = tc.get_info()
        assert info.model_data.model_name == name


def test_an_unknown_name_says_how_to_add_an_alias(service):
    with pytest.raises(Exception, match='--model-alias'):
        service.create_lora_training_client(base_model='Qwen/Qwen3-32B', rank=4).result()


def test_a_too_long_completion_says_how_to_raise_the_limit(service):
    tc = service.create_lora_training_client(base_model=ALIAS, rank=4, seed=0).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints([5, 6, 7])
    with pytest.raises(Exception, match='--max-new-tokens'):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=9)).result()
    out = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=8, temperature=0.0)).result()
    assert 1 <= len(out.sequences[0].tokens) <= 8
