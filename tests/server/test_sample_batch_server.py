"""Through the server: sample requests of two tenants waiting together are decoded in one loop, and each
tenant gets the samples it gets alone."""
from __future__ import annotations

import threading
import time

import pytest

tinker = pytest.importorskip('tinker')
from tinker import types  # noqa: E402

from .conftest import KEY_A, KEY_B, MODEL  # noqa: E402


def test_two_tenants_share_one_decode_loop_and_get_what_they_get_alone(server, monkeypatch):
    clients = [tinker.ServiceClient(base_url=server.url, api_key=key) for key in (KEY_A, KEY_B)]
    try:
        samplers = [c.create_sampling_client(base_model=MODEL) for c in clients]
        asks = [(types.ModelInput.from_ints([5, 6, 7, 8]), 2, types.SamplingParams(max_tokens=6, seed=3)),
                (types.ModelInput.from_ints([40, 41]), 3, types.SamplingParams(max_tokens=5, temperature=0.0))]

        def ask(i):
            return samplers[i].sample(*asks[i])

        alone = [ask(i).result() for i in range(2)]
        sizes = []
        engine = server.ctx.engine
        real = engine.sample_many
        monkeypatch.setattr(engine, 'sample_many', lambda calls: sizes.append(len(calls)) or real(calls))
        hold, held = threading.Event(), threading.Event()
        server.ctx.worker.put('holder', lambda: (held.set(), hold.wait(60)))
        assert held.wait(60)
        futures = [ask(0), ask(1)]
        deadline = time.monotonic() + 60
        while server.ctx.queue.depth() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        hold.set()
        together = [f.result() for f in futures]
        assert sizes == [2]
        for a, b in zip(alone, together):
            assert [list(s.tokens) for s in a.sequences] == [list(s.tokens) for s in b.sequences]
            for s, t in zip(a.sequences, b.sequences):
                assert t.logprobs == pytest.approx(s.logprobs, abs=1e-5)
    finally:
        for c in clients:
            c.close('success')
