"""Every route the installed tinker SDK can call is served, or refused with a 4xx that says why."""
from __future__ import annotations

import pathlib
import pickle
import re

import pytest

tinker = pytest.importorskip('tinker')
from tinker import types  # noqa: E402

from twinkle.server.routes_tinker_rest import NOT_APPLICABLE  # noqa: E402

from .conftest import KEY_A, KEY_C, MODEL  # noqa: E402

_CALL = re.compile(r'(?:client|self)\._?(get|post|put|delete|patch)\(\s*f?"(/api/v1/[^"]+)"', re.S)


def sdk_routes():
    """(METHOD, path) of every call in the installed SDK's sources."""
    root = pathlib.Path(tinker.__file__).parent
    found = set()
    for source in root.rglob('*.py'):
        for method, path in _CALL.findall(source.read_text()):
            found.add((method.upper(), path))
    return sorted(found)


def test_the_sdk_routes_are_enumerated():
    routes = sdk_routes()
    assert ('POST', '/api/v1/asample') in routes and ('PUT', '/api/v1/sessions/{session_id}/project') in routes
    assert len(routes) >= 40


@pytest.mark.parametrize('method,path', sdk_routes())
def test_every_sdk_route_exists_and_never_5xx(server, method, path):
    url = re.sub(r'\{[^}]+\}', 'x', path)
    with server.client(KEY_A) as c:
        resp = c.request(method, url, json={} if method in ('POST', 'PUT') else None)
    assert resp.status_code < 500, resp.text
    assert resp.status_code != 405, f'{method} {path} is not routed'
    if resp.status_code == 404:
        assert resp.json()['detail'] != 'Not Found', f'{method} {path} is not routed'


@pytest.mark.parametrize('method,path', sorted(NOT_APPLICABLE))
def test_not_applicable_routes_say_why(server, method, path):
    url = '/api/v1' + re.sub(r'\{[^}]+\}', 'x', path).replace(':path', '')
    with server.client(KEY_A) as c:
        resp = c.request(method, url, json={})
    assert resp.status_code == 404 and 'self-hosted' in resp.json()['detail']


@pytest.fixture(scope='module')
def service(server):
    client = tinker.ServiceClient(base_url=server.url, api_key=KEY_C)
    yield client
    client.close('success')


def test_sessions_are_listed_and_described_through_the_sdk(server, service):
    tc = service.create_lora_training_client(base_model=MODEL, rank=4).result()
    rest = tinker.RestClient(base_url=server.url, api_key=KEY_C)
    session_id = service.holder.get_session_id()
    assert session_id in rest.list_sessions(limit=1000).result().sessions
    info = rest.get_session(session_id).result()
    assert tc.model_id in info.training_run_ids
    other = tinker.RestClient(base_url=server.url, api_key=KEY_A)
    with pytest.raises(tinker.NotFoundError):
        other.get_session(session_id).result()


def test_a_pickled_sampling_client_joins_its_session_and_samples(server, service):
    sampler = service.create_sampling_client(base_model=MODEL)
    prompt, params = types.ModelInput.from_ints([5, 6, 7]), types.SamplingParams(max_tokens=2, seed=1)
    first = sampler.sample(prompt, 1, params).result()
    clone = pickle.loads(pickle.dumps(sampler))
    again = clone.sample(prompt, 1, params).result()
    assert again.sequences[0].tokens == first.sequences[0].tokens
    joined = [s for s in server.ctx.tinker.samplers.values() if s.clients]
    assert joined, 'the clone did not ask for its own client number'


def test_hosted_only_checkpoint_actions_are_clear_4xx_through_the_sdk(server, service):
    tc = service.create_lora_training_client(base_model=MODEL, rank=4).result()
    path = tc.save_state('kept').result().path
    rest = tinker.RestClient(base_url=server.url, api_key=KEY_C)
    for call in (lambda: rest.publish_checkpoint_from_tinker_path(path).result(),
                 lambda: rest.set_checkpoint_ttl_from_tinker_path(path, 3600).result()):
        with pytest.raises(tinker.NotFoundError, match='self-hosted'):
            call()
