"""The served model's thread counts: a tenant's own work leaves the event loop a core, a batch across tenants
uses every core, and the count is put back after a batch."""
from __future__ import annotations

import threading

import torch

from twinkle.server.config import ServerSettings
from twinkle.server.threads import batch_compute_threads, compute_threads, usable_cores, using_threads

KEY = 'tml-threads-0123456789'


def test_batches_use_every_core_unless_set(monkeypatch):
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    assert batch_compute_threads(ServerSettings(api_keys=[KEY])) == usable_cores()
    assert compute_threads(ServerSettings(api_keys=[KEY])) == max(1, usable_cores() - 1)
    monkeypatch.setenv('OMP_NUM_THREADS', '3')
    assert batch_compute_threads(ServerSettings(api_keys=[KEY])) == 3
    assert batch_compute_threads(ServerSettings(api_keys=[KEY], batch_compute_threads=5)) == 5


def test_using_threads_sets_the_count_in_the_block_and_puts_it_back():
    seen = {}

    def run() -> None:   # on a thread of its own, as the model worker: the count is per thread
        torch.set_num_threads(1)
        with using_threads(2):
            seen['inside'] = torch.get_num_threads()
        seen['after'] = torch.get_num_threads()
        with using_threads(None):
            seen['unchanged'] = torch.get_num_threads()
        try:
            with using_threads(2):
                raise KeyError('boom')
        except KeyError:
            seen['after_error'] = torch.get_num_threads()

    before = torch.get_num_threads()
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert seen == {'inside': 2, 'after': 1, 'unchanged': 1, 'after_error': 1}
    torch.set_num_threads(before)
