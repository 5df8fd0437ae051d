"""What sampling records for ``stable_reinforce`` and how a training datum's provenance is checked against it.

A sample request with ``record_stability_info`` stores, per sampled sequence (named by its ``sequence_id``),
the prompt, the sampled tokens and the sampler's logprobs of them. A training datum names those sequences
through provenance spans: ``loss_fn_input_spans`` tile its targets, ``model_input_spans`` its input tokens.
Resolving a datum checks every claimed input token and sampled target against the record (targets under
a prompt span carry no loss and may be padding) and yields, per target position, the
recorded sampler logprob and whether that position was sampled (only sampled positions carry the loss).

Records belong to the tenant that sampled them, live a day from their last use, and are capped per tenant in
count and in stored tokens (the oldest go first), so a client that never trains on its samples cannot grow
the server's memory.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .errors import BadRequest

RECORD_TTL_S = 24 * 3600.0
MAX_RECORDS_PER_TENANT = 20000
MAX_TOKENS_PER_TENANT = 4_000_000   # stored tokens (a request's prompt counted once), about 32 MB


@dataclass
class SequenceRecord:
    prompt: List[int]          # shared by the sequences of one request
    tokens: List[int]
    logprobs: List[float]
    cost: int = 0
    used: float = field(default_factory=time.time)


Span = Tuple[str, str, int, int]  # (kind 'prompt'|'sampled', sequence_id, offset, length)


class StabilityStore:

    def __init__(self, ttl_s: float = RECORD_TTL_S, max_per_tenant: int = MAX_RECORDS_PER_TENANT,
                 max_tokens_per_tenant: int = MAX_TOKENS_PER_TENANT) -> None:
        self.ttl_s = ttl_s
        self.max_per_tenant = max_per_tenant
        self.max_tokens_per_tenant = max_tokens_per_tenant
        self._records: Dict[str, 'OrderedDict[str, SequenceRecord]'] = {}
        self._tokens: Dict[str, int] = {}
        self._lock = threading.Lock()

    def record(self, tenant: str, sequence_ids: Sequence[str], prompt: Sequence[int],
               sequences: Sequence[Tuple[Sequence[int], Sequence[float]]]) -> None:
        shared = [int(t) for t in prompt]
        with self._lock:
            records = self._records.setdefault(tenant, OrderedDict())
            for i, (sid, (tokens, logprobs)) in enumerate(zip(sequence_ids, sequences)):
                cost = len(tokens) + (len(shared) if i == 0 else 0)
                old = records.pop(sid, None)
                if old is not None:
                    self._tokens[tenant] -= old.cost
                records[sid] = SequenceRecord(shared, [int(t) for t in tokens], [float(x) for x in logprobs], cost)
                self._tokens[tenant] = self._tokens.get(tenant, 0) + cost
            while records and (len(records) > self.max_per_tenant
                               or self._tokens[tenant] > self.max_tokens_per_tenant):
                _, gone = records.popitem(last=False)
                self._tokens[tenant] -= gone.cost

    def get(self, tenant: str, sequence_id: str) -> SequenceRecord:
        now = time.time()
        with self._lock:
            records = self._records.get(tenant, OrderedDict())
            rec = records.get(sequence_id)
            if rec is not None and now - rec.used > self.ttl_s:
                del records[sequence_id]
                self._tokens[tenant] -= rec.cost
                rec = None
            if rec is None:
                raise BadRequest(f'sequence_id {sequence_id!r} names no recorded sample: sample with '
                                 f'record_stability_info=True, from this API key, within a day of training on it')
            rec.used = now
            records.move_to_end(sequence_id)
            return rec


def spans_of(field_msgs: Any) -> List[Span]:
    spans: List[Span] = []
    for span in field_msgs:
        kind = span.WhichOneof('span')
        if kind is None:
            raise BadRequest('a provenance span names neither prompt_tokens nor sampled_tokens')
        arm = getattr(span, kind)
        if arm.length < 0 or arm.offset < 0 or not arm.sequence_id:
            raise BadRequest('a provenance span needs a sequence_id, offset >= 0 and length >= 0')
        spans.append(('prompt' if kind == 'prompt_tokens' else 'sampled', arm.sequence_id, int(arm.offset),
                      int(arm.length)))
    return spans


def _claimed(rec: SequenceRecord, kind: str, offset: int, length: int, what: str, sid: str) -> List[int]:
    source = rec.prompt if kind == 'prompt' else rec.tokens
    if offset + length > len(source):
        raise BadRequest(f'{what}: span [{offset}, {offset + length}) of {kind} tokens of sequence {sid!r} is past '
                         f'its end ({len(source)} {kind} tokens)')
    return source[offset:offset + length]


def resolve(store: StabilityStore, tenant: str, where: str, tokens: np.ndarray, targets: np.ndarray,
            input_spans: List[Span], target_spans: List[Span]) -> Tuple[np.ndarray, np.ndarray]:
    """(sampler logprobs [N], sampled mask [N]) for a datum's targets, after checking its provenance."""
    if not target_spans or not input_spans:
        raise BadRequest(f'{where} has no provenance: stable_reinforce needs every datum built with '
                         f'Datum.with_provenance (spans naming the sampled sequences)')
    for name, spans, values in (('model_input_spans', input_spans, tokens), ('loss_fn_input_spans', target_spans,
                                                                             targets)):
        total = sum(s[3] for s in spans)
        if total != values.size:
            raise BadRequest(f'{where}.{name} cover {total} positions; they must tile all {values.size}')
    pos = 0
    for kind, sid, offset, length in input_spans:
        want = _claimed(store.get(tenant, sid), kind, offset, length, f'{where}.model_input_spans', sid)
        if [int(t) for t in tokens[pos:pos + length]] != want:
            raise BadRequest(f'{where}.model_input_spans: tokens {pos}..{pos + length} differ from the {kind} tokens '
                             f'of sequence {sid!r} they claim to be')
        pos += length
    old = np.zeros(targets.size, dtype=np.float32)
    sampled = np.zeros(targets.size, dtype=np.float32)
    pos = 0
    for kind, sid, offset, length in target_spans:
        rec = store.get(tenant, sid)
        want = _claimed(rec, kind, offset, length, f'{where}.loss_fn_input_spans', sid)
        # Targets under a prompt span carry no loss, and clients pad them (tinker-cookbook's rl_loop sends
        # zeros there), so only the sampled targets, the ones trained on, must be the recorded tokens.
        if kind == 'sampled' and [int(t) for t in targets[pos:pos + length]] != want:
            raise BadRequest(f'{where}.loss_fn_input_spans: target_tokens {pos}..{pos + length} differ from the '
                             f'{kind} tokens of sequence {sid!r} they claim to be')
        if kind == 'sampled':
            old[pos:pos + length] = rec.logprobs[offset:offset + length]
            sampled[pos:pos + length] = 1.0
        pos += length
    return old, sampled
