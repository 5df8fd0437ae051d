"""The native client's 429 handling: it waits and retries a transient refusal, and gives up at once on a cap the
server marks as one that waiting cannot lift (``x-should-retry: false``)."""
from __future__ import annotations

from typing import List

import httpx
import pytest

from twinkle.client.http import ServerError, TwinkleClient


def client_answering(answers: List[httpx.Response]) -> tuple:
    seen: List[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers[min(len(seen), len(answers)) - 1]

    client = TwinkleClient('http://server.test', 'key', max_429_retries=3)
    client._http = httpx.Client(base_url='http://server.test', transport=httpx.MockTransport(handler))
    return client, seen


def test_a_transient_429_is_retried_after_its_retry_after():
    client, seen = client_answering([httpx.Response(429, headers={'Retry-After': '0'}, json={'detail': 'busy'}),
                                     httpx.Response(200, json={'ok': True})])
    assert client.request('GET', '/x') == {'ok': True}
    assert len(seen) == 2


def test_a_429_marked_not_retryable_fails_at_once():
    client, seen = client_answering([httpx.Response(429, headers={'x-should-retry': 'false', 'Retry-After': '0'},
                                                    json={'detail': 'limits.max_objects_per_tenant'})])
    with pytest.raises(ServerError) as err:
        client.request('GET', '/x')
    assert err.value.status == 429 and 'max_objects_per_tenant' in err.value.detail
    assert len(seen) == 1


def test_retries_stop_at_max_429_retries():
    client, seen = client_answering([httpx.Response(429, headers={'Retry-After': '0'}, json={'detail': 'busy'})])
    with pytest.raises(ServerError):
        client.request('GET', '/x')
    assert len(seen) == 4
