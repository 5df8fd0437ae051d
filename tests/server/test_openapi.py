"""The OpenAPI document, strict request validation, and a bounded schemathesis run that must see no 5xx and
only answers that fit their documented response models."""
from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest

from twinkle.server.testing import ThreadServer

from .conftest import KEY_A, MODEL

FUZZ_KEY = 'tml-fuzz-tenant-0123456789'


def test_openapi_documents_models_and_error_codes(server):
    with server.client(KEY_A) as c:
        schema = c.get('/openapi.json').json()
        docs = c.get('/docs')
    assert docs.status_code == 200 and 'swagger' in docs.text.lower()
    paths = schema['paths']
    routes = {(path, method) for path, ops in paths.items() for method in ops}
    for expected in [('/api/v1/create_model', 'post'), ('/api/v1/asample', 'post'), ('/api/v1/optim_step', 'post'),
                     ('/api/v1/training_runs', 'get'), ('/api/v1/forward_backward', 'post')]:
        assert expected in routes
    # Request models, with their constraints.
    create = paths['/api/v1/create_model']['post']['requestBody']['content']['application/json']['schema']
    assert create['$ref'].endswith('/CreateModel')
    lora = schema['components']['schemas']['LoraBody']['properties']['rank']
    assert lora['type'] == 'integer' and lora['minimum'] == 1
    assert 'application/x-protobuf' in paths['/api/v1/forward_backward']['post']['requestBody']['content']
    # The 4xx codes each route answers, with the shared error body.
    def codes(path, method):
        return {int(c) for c in paths[path][method]['responses'] if c.isdigit()}
    assert {400, 401, 404, 409, 413, 415, 429} <= codes('/api/v1/forward_backward', 'post')
    assert {400, 401, 404, 409, 429} <= codes('/api/v1/optim_step', 'post')
    assert {401, 404} == codes('/api/v1/auth/token', 'post') - {200}
    err = paths['/api/v1/optim_step']['post']['responses']['409']['content']['application/json']['schema']
    assert err['$ref'].endswith('/ErrorBody')
    assert schema['components']['securitySchemes']['ApiKey']['name'] == 'X-API-Key'


@pytest.mark.parametrize('rank', ['8', True, 8.0, 8.5, None])
def test_create_model_validation_is_strict(server, rank):
    with server.client(KEY_A) as c:
        session = c.post('/api/v1/create_session', json={}).json()['session_id']
        resp = c.post('/api/v1/create_model', json={'session_id': session, 'model_seq_id': 0, 'base_model': MODEL,
                                                     'lora_config': {'rank': rank}})
    assert resp.status_code == 400 and 'rank' in resp.json()['detail']


def test_sampling_params_are_strict(server):
    with server.client(KEY_A) as c:
        for params in ({'max_tokens': '4'}, {'max_tokens': True}, {'temperature': '1.0'}, {'seed': 1.5}):
            resp = c.post('/api/v1/asample', json={'base_model': MODEL, 'prompt': {'chunks': [{'tokens': [1, 2]}]},
                                                   'sampling_params': params})
            assert resp.status_code == 400, (params, resp.text)


@pytest.fixture(scope='module')
def fuzz_server(tmp_path_factory):
    # Its own server with small limits, so the generated work stays cheap and other tests' server stays idle.
    srv = ThreadServer(str(tmp_path_factory.mktemp('fuzz-data')), [FUZZ_KEY], model=MODEL, long_poll_s=0.5,
                       limits={'max_tokens_per_request': 64, 'max_new_tokens': 4, 'max_adapters_per_tenant': 4,
                               'max_sessions_per_tenant': 50})
    assert srv.url.startswith('http://127.0.0.1:')   # loopback only
    yield srv
    srv.stop()


EXAMPLES_PER_OPERATION = 5   # ~70 operations: a few hundred requests in all
TIME_BUDGET_S = 300.0


def test_schemathesis_finds_no_server_error(fuzz_server):
    schemathesis = pytest.importorskip('schemathesis')
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.core.failures import FailureGroup
    from schemathesis.specs.openapi.checks import response_schema_conformance

    # forward_backward takes raw protobuf bytes: generate them as the binary bodies they are.
    schemathesis.serializer.alias('application/x-protobuf', 'application/octet-stream')
    schema_doc = httpx.get(fuzz_server.url + '/openapi.json').json()
    schema = schemathesis.openapi.from_dict(schema_doc)
    failures, calls, started, statuses, nonconforming = [], 0, time.monotonic(), Counter(), []
    headers = {'X-API-Key': FUZZ_KEY}
    for result in schema.get_all_operations():
        operation = result.ok()
        if time.monotonic() - started > TIME_BUDGET_S:
            pytest.fail(f'the schemathesis run took longer than {TIME_BUDGET_S}s after {calls} requests')

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            nonlocal calls
            calls += 1
            resp = case.call(base_url=fuzz_server.url, headers=headers, timeout=60)
            statuses[resp.status_code // 100 * 100] += 1
            if resp.status_code >= 500:
                failures.append(f'{case.method} {case.formatted_path} -> {resp.status_code}: {resp.text[:300]}')
                return
            try:  # every other answer has the body its response model documents
                case.validate_response(resp, checks=[response_schema_conformance], headers=headers)
            except FailureGroup as exc:
                nonconforming.append(f'{case.method} {case.formatted_path} -> {resp.status_code}: {str(exc)[:500]}')

        check()
    assert calls >= 100
    # The key was taken (not every answer a 401) and valid bodies reached the handlers.
    assert statuses[200] >= 20 and statuses[400] >= 20, statuses
    assert not failures, '\n'.join(failures[:20])
    assert not nonconforming, '\n'.join(nonconforming[:10])
    # The server still answers normally after the run.
    assert httpx.get(fuzz_server.url + '/api/v1/healthz').json() == {'status': 'ok'}


def test_openapi_documents_response_models(server):
    with server.client(KEY_A) as c:
        schema = c.get('/openapi.json').json()
    generic = []
    for path, ops in schema['paths'].items():
        for method, op in ops.items():
            not_found = op['responses'].get('404', {}).get('description', '')
            if not_found.startswith('Not available on a self-hosted server'):
                continue   # these only ever answer 404
            body = op['responses']['200']['content']['application/json']['schema']
            values = body.get('additionalProperties')   # a JSON object of models (the native method table)
            if not ('$ref' in body or 'anyOf' in body or (isinstance(values, dict) and '$ref' in values)):
                generic.append(f'{method.upper()} {path}: {body}')
    assert not generic, '\n'.join(generic)
    models = schema['components']['schemas']
    assert set(models['Accepted']['required']) == {'request_id'}
    assert models['TrainingRunInfo']['properties']['last_checkpoint']['anyOf'][0]['$ref'].endswith('/CheckpointInfo')
    future = schema['paths']['/api/v1/retrieve_future']['post']['responses']['200']['content']
    assert {'$ref': '#/components/schemas/TryAgain'} in future['application/json']['schema']['anyOf']
    assert 'application/x-protobuf' in future
