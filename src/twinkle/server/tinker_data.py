"""Tinker wire data <-> Twinkle batches and losses.

A Tinker datum holds ``model_input`` tokens ``x[0..N)`` and per-position ``loss_fn_inputs`` aligned with
``target_tokens`` ``y[0..N)`` (``y[i]`` is predicted from ``x[..i]``). Twinkle aligns labels with
``input_ids`` (HF style), so a datum becomes ``input_ids = x + [y[N-1]]`` and ``labels = [-100] + y``:
then ``logps[:, 1:N+1]`` are exactly Tinker's per-target logprobs.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from .errors import BadRequest, TooLarge, Unsupported

IGNORE = -100
_DTYPES = {1: np.float32, 2: np.int64, 3: np.int32}
# loss_fn -> (required inputs, optional inputs, accepted loss_fn_config keys)
LOSSES: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[str, ...]]] = {
    'cross_entropy': (('target_tokens',), ('weights',), ()),
    # 'weights' multiply each target's term of the RL losses too (tinker_losses.py).
    'importance_sampling': (('target_tokens', 'logprobs', 'advantages'), ('weights',), ()),
    'ppo': (('target_tokens', 'logprobs', 'advantages'), ('weights',), ('clip_low_threshold', 'clip_high_threshold')),
    'cispo': (('target_tokens', 'logprobs', 'advantages'), ('weights',),
              ('clip_low_threshold', 'clip_high_threshold')),
    'dro': (('target_tokens', 'logprobs', 'advantages'), ('weights',), ('beta',)),
    'gspo': (('target_tokens', 'logprobs', 'advantages'), ('sequence_ratio_mask', 'weights'),
             ('clip_low_threshold', 'clip_high_threshold')),
    # The sampler logprobs come from the records sampling made; a datum's own 'logprobs' are not used.
    'stable_reinforce': (('target_tokens', 'advantages'), ('logprobs', 'weights'), ('kl_coeff',)),
}
# Losses whose datums must carry provenance spans (resolved against the sampling records).
NEEDS_PROVENANCE = ('stable_reinforce',)
# Losses the SDK can name that this server does not compute, with the reason a client gets.
REFUSED_LOSSES = {
    'custom': 'custom losses run on the client with forward_backward_custom (this server reports '
              'custom_loss_server_side=false, so the SDK never uploads them)',
}


def pb():
    from tinker.proto import tinker_public_pb2
    return tinker_public_pb2


def parse_forward_backward(body: bytes, content_type: str, content_encoding: str, max_bytes: int) -> Any:
    """The ForwardBackwardRequest of a body; blocking work (decompression, parsing): call it off the event loop."""
    if 'application/x-protobuf' not in (content_type or ''):
        raise Unsupported('forward_backward takes a protobuf body (Content-Type: application/x-protobuf), as the '
                          'tinker SDK sends it')
    too_large = TooLarge(f'the forward_backward body is larger than {max_bytes} bytes (limits.max_body_bytes): split '
                         f'the batch into smaller calls')
    if len(body) > max_bytes:
        raise too_large
    if (content_encoding or '').lower() == 'zstd':
        body = _unzstd(body, max_bytes, too_large)
    elif content_encoding and content_encoding.lower() not in ('identity',):
        raise Unsupported(f'Content-Encoding {content_encoding!r} is not supported (use zstd or none)')
    msg = pb().ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception:
        raise BadRequest('forward_backward body is not a valid ForwardBackwardRequest protobuf') from None
    return msg


def _unzstd(body: bytes, max_bytes: int, too_large: Exception) -> bytes:
    # Streamed, so a small body claiming (or expanding to) gigabytes stops at the limit.
    import io

    import zstandard
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)) as reader:
            while True:
                piece = reader.read(1 << 20)
                if not piece:
                    break
                out += piece
                if len(out) > max_bytes:
                    raise too_large
    except zstandard.ZstdError as exc:
        raise BadRequest(f'forward_backward body is not valid zstd: {exc}') from None
    return bytes(out)


def loss_config(msg: Any) -> Dict[str, Any]:
    config: Dict[str, Any] = {}
    for key, value in msg.loss_fn_config_v2.items():
        config[key] = value.text if value.WhichOneof('value') == 'text' else value.number
    for key, value in msg.loss_fn_config.items():
        config.setdefault(key, value)
    return config


def check_loss_fn(loss_fn: str) -> None:
    if loss_fn in REFUSED_LOSSES:
        raise BadRequest(f'loss_fn {loss_fn!r} is not computed by this server: {REFUSED_LOSSES[loss_fn]}')
    if loss_fn not in LOSSES:
        raise BadRequest(f'loss_fn {loss_fn!r} is not supported by this server; supported: {sorted(LOSSES)}')


def make_loss(loss_fn: str, config: Mapping[str, Any]) -> Any:
    from ..loss import CISPOLoss, CrossEntropyLoss, ImportanceSamplingLoss, PPOLoss
    from .tinker_losses import DROLoss, GSPOLoss, StableReinforceLoss, TokenWeighted
    check_loss_fn(loss_fn)
    allowed = LOSSES[loss_fn][2]
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise BadRequest(f'loss_fn_config keys {unknown} are not supported for {loss_fn!r}; accepted: {list(allowed)}')
    kwargs = {}
    for key, value in config.items():
        if isinstance(value, str) or not math.isfinite(float(value)):
            raise BadRequest(f'loss_fn_config[{key!r}] must be a finite number, got {value!r}')
        kwargs[key] = float(value)
    if loss_fn == 'cross_entropy':
        return CrossEntropyLoss(reduction='sum')
    if loss_fn == 'importance_sampling':
        return TokenWeighted(ImportanceSamplingLoss(loss_type='sum'))
    try:
        if loss_fn == 'ppo':
            return TokenWeighted(PPOLoss(loss_type='sum', **kwargs))
        if loss_fn == 'dro':
            return DROLoss(**kwargs)
        if loss_fn == 'gspo':
            return GSPOLoss(**kwargs)
        if loss_fn == 'stable_reinforce':
            return StableReinforceLoss(**kwargs)
        return TokenWeighted(CISPOLoss(loss_type='sum', **kwargs))
    except ValueError as exc:
        raise BadRequest(f'loss_fn_config for {loss_fn!r}: {exc}') from None


def tensor(msg: Any, what: str, max_elements: int) -> np.ndarray:
    """The array of a TensorData; its shape may not claim more than ``max_elements`` values (a sparse tensor
    is made dense here, so its shape alone decides the memory it takes)."""
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise BadRequest(f'{what} has an unsupported dtype ({msg.dtype}); send float32 or int64')
    shape = [int(s) for s in msg.shape]
    if any(s < 0 for s in shape) or math.prod(shape) > max_elements:
        raise BadRequest(f'{what} has shape {shape}; expected at most {max_elements} values (one per model_input '
                         f'token)')
    if msg.WhichOneof('encoding') == 'sparse_csr':
        csr = msg.sparse_csr
        values = np.frombuffer(csr.values, dtype=dtype)
        crow = np.frombuffer(csr.crow_indices, dtype=np.int64)
        col = np.frombuffer(csr.col_indices, dtype=np.int64)
        if len(shape) != 2 or len(crow) != shape[0] + 1 or len(col) != len(values):
            raise BadRequest(f'{what} is a malformed sparse CSR tensor')
        dense = np.zeros(shape, dtype=dtype)
        for r in range(shape[0]):
            cols = col[crow[r]:crow[r + 1]]
            if len(cols) and (cols.min() < 0 or cols.max() >= shape[1]):
                raise BadRequest(f'{what} has a sparse column index out of range')
            dense[r, cols] = values[crow[r]:crow[r + 1]]
        return dense
    arr = np.frombuffer(msg.dense, dtype=dtype)
    if shape:
        if int(np.prod(shape)) != arr.size:
            raise BadRequest(f'{what} has {arr.size} values but shape {shape}')
        arr = arr.reshape(shape)
    return arr


def datum_rows(msg: Any, loss_fn: str, max_tokens: int) -> List[Dict[str, np.ndarray]]:
    """Validated per-datum arrays: 'tokens' (int64 [N]) and the loss inputs (each [N])."""
    check_loss_fn(loss_fn)
    required, optional, _ = LOSSES[loss_fn]
    if not msg.data:
        raise BadRequest('forward_backward needs at least one datum')
    rows, total = [], 0
    for i, datum in enumerate(msg.data):
        pieces = []
        for chunk in datum.model_input:
            if chunk.WhichOneof('chunk') != 'encoded_text':
                raise BadRequest(f'data[{i}].model_input has a {chunk.WhichOneof("chunk")} chunk; this server takes '
                                 f'text tokens only')
            pieces.append(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).astype(np.int64))
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        if tokens.size == 0:
            raise BadRequest(f'data[{i}].model_input is empty')
        names = set(datum.loss_fn_inputs.keys())
        missing = [n for n in required if n not in names]
        extra = sorted(names - set(required) - set(optional))
        if missing or extra:
            raise BadRequest(f'data[{i}].loss_fn_inputs for {loss_fn!r} needs {list(required)}'
                             f'{" (optional " + str(list(optional)) + ")" if optional else ""}; '
                             f'missing {missing}, unexpected {extra}')
        # Besides arrays, a row may carry provenance spans (lists), read by the stability check.
        row: Dict[str, Any] = {'tokens': tokens}
        if loss_fn in NEEDS_PROVENANCE:
            from .stability import spans_of
            row['input_spans'] = spans_of(datum.model_input_spans)
            row['target_spans'] = spans_of(datum.loss_fn_input_spans)
        for name in names:
            arr = tensor(datum.loss_fn_inputs[name], f'data[{i}].loss_fn_inputs[{name!r}]', tokens.size)
            if arr.ndim != 1 or arr.shape[0] != tokens.size:
                raise BadRequest(f'data[{i}].loss_fn_inputs[{name!r}] has shape {list(arr.shape)}; expected '
                                 f'[{tokens.size}] (one value per model_input token)')
            if not np.all(np.isfinite(arr.astype(np.float64))):
                raise BadRequest(f'data[{i}].loss_fn_inputs[{name!r}] holds NaN or infinite values')
            row[name] = arr
        total += tokens.size + 1
        rows.append(row)
    if total > max_tokens:
        raise TooLarge(f'this request holds {total} tokens; the server accepts at most {max_tokens} per request '
                       f'(limits.max_tokens_per_request): split the batch into smaller forward_backward calls')
    return rows


def apply_provenance(rows: List[Dict[str, Any]], lookup: Any, tenant: str) -> None:
    """Replace each row's sampler logprobs by the recorded ones and mark its sampled targets."""
    from .stability import resolve
    for i, row in enumerate(rows):
        if 'target_spans' not in row or 'sampled_mask' in row:
            continue
        old, sampled = resolve(lookup, tenant, f'data[{i}]', row['tokens'], row['target_tokens'].astype(np.int64),
                               row['input_spans'], row['target_spans'])
        row['logprobs'], row['sampled_mask'] = old, sampled


def build_batch(rows: List[Dict[str, np.ndarray]], pad_id: int) -> Dict[str, Any]:
    import torch
    width = max(r['tokens'].size for r in rows) + 1
    b = len(rows)
    ids = torch.full((b, width), int(pad_id), dtype=torch.long)
    labels = torch.full((b, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    floats = {'weights': torch.zeros((b, width)), 'old_logps': torch.zeros((b, width)),
              'advantages': torch.zeros((b, width)), 'sequence_ratio_mask': torch.zeros((b, width)),
              'sampled_mask': torch.zeros((b, width))}
    present = set()
    for i, row in enumerate(rows):
        n = row['tokens'].size
        target = torch.as_tensor(row['target_tokens'].astype(np.int64))
        ids[i, :n] = torch.as_tensor(row['tokens'])
        ids[i, n] = target[-1]
        labels[i, 1:n + 1] = target
        mask[i, :n + 1] = 1
        for src, dst in (('weights', 'weights'), ('logprobs', 'old_logps'), ('advantages', 'advantages'),
                         ('sequence_ratio_mask', 'sequence_ratio_mask'), ('sampled_mask', 'sampled_mask')):
            if src in row:
                floats[dst][i, 1:n + 1] = torch.as_tensor(row[src].astype(np.float32))
                present.add(dst)
            elif src == 'weights':
                floats[dst][i, 1:n + 1] = 1.0
                present.add(dst)
            elif src == 'sequence_ratio_mask':
                # A datum without a mask takes its sequence ratio over all its targets.
                floats[dst][i, 1:n + 1] = 1.0
    batch = {'input_ids': ids, 'labels': labels, 'attention_mask': mask}
    batch.update({k: v for k, v in floats.items() if k in present})
    return batch


def output_proto(rows: List[Dict[str, np.ndarray]], logps: Any, weights: Any, loss_fn: str,
                 metrics: Mapping[str, float]) -> bytes:
    """A ForwardBackwardOutput: per-datum 'logprobs' (and 'elementwise_loss' for cross_entropy)."""
    p = pb()
    fields: Dict[str, List[np.ndarray]] = {'logprobs': []}
    if loss_fn == 'cross_entropy':
        fields['elementwise_loss'] = []
    for i, row in enumerate(rows):
        n = row['tokens'].size
        lp = logps[i, 1:n + 1].detach().float().cpu().numpy().astype(np.float32)
        fields['logprobs'].append(lp)
        if 'elementwise_loss' in fields:
            w = weights[i, 1:n + 1].detach().float().cpu().numpy().astype(np.float32)
            fields['elementwise_loss'].append((-lp * w).astype(np.float32))
    out = p.ForwardBackwardOutput(loss_fn_output_type='ArrayRecord')
    record = out.loss_fn_outputs.add()
    record.num_datums = len(rows)
    for name, arrays in fields.items():
        offsets = np.cumsum([0] + [a.nbytes for a in arrays]).astype(np.int64)
        bt = record.fields[name]
        bt.dtype = p.DTYPE_FLOAT32
        bt.data = b''.join(a.tobytes() for a in arrays)
        bt.offsets = offsets.tobytes()
    for key, value in metrics.items():
        out.metrics[key] = float(value)
    return out.SerializeToString()


TargetCells = Tuple[np.ndarray, Any]  # (int64 [len(prompt) - 1, K] with -1 for no request, CSR (crow, col) or None)


def target_cells(td: Any, prompt_len: int) -> TargetCells:
    """The cells of a request's ``target_prompt_logprobs`` (a JSON TensorData), validated."""
    what = 'target_prompt_logprobs'
    if td.dtype != 'int64':
        raise BadRequest(f'{what} must be an int64 tensor of token ids; got dtype {td.dtype!r}')
    shape = td.shape or [len(td.data)]
    if len(shape) != 2 or shape[0] != prompt_len - 1 or not 1 <= shape[1] <= 1024:
        raise BadRequest(f'{what} has shape {shape}; expected [len(prompt) - 1, K] = [{prompt_len - 1}, K] '
                         f'with 1 <= K <= 1024')
    rows, k = shape
    if any(not isinstance(v, int) or isinstance(v, bool) for v in td.data):
        raise BadRequest(f'{what} holds non-integer values')
    values = np.asarray(td.data, dtype=np.int64)
    if (values < -1).any():
        raise BadRequest(f'{what} holds ids below -1 (-1 marks a cell that asks nothing)')
    if td.sparse_crow_indices is None and td.sparse_col_indices is None:
        if values.size != rows * k:
            raise BadRequest(f'{what} has {values.size} values but shape {shape}')
        return values.reshape(rows, k), None
    crow = np.asarray(td.sparse_crow_indices or [], dtype=np.int64)
    col = np.asarray(td.sparse_col_indices or [], dtype=np.int64)
    if (len(crow) != rows + 1 or len(col) != values.size or crow[0] != 0 or crow[-1] != values.size
            or (np.diff(crow) < 0).any() or (col.size and (col.min() < 0 or col.max() >= k))):
        raise BadRequest(f'{what} is a malformed sparse CSR tensor')
    dense = np.full((rows, k), -1, dtype=np.int64)
    for r in range(rows):
        dense[r, col[crow[r]:crow[r + 1]]] = values[crow[r]:crow[r + 1]]
    return dense, (crow, col)


def _tensor_proto(msg: Any, arr: np.ndarray, dtype: int) -> None:
    msg.dtype = dtype
    msg.shape.extend(arr.shape)
    msg.dense = np.ascontiguousarray(arr).tobytes()


def _topk_proto(msg: Any, topk: Tuple[np.ndarray, np.ndarray]) -> None:
    ids, lps = topk
    msg.length, msg.k = int(ids.shape[0]), int(ids.shape[1]) if ids.ndim == 2 else 0
    msg.token_ids = np.ascontiguousarray(ids, dtype=np.int32).tobytes()
    msg.logprobs = np.ascontiguousarray(lps, dtype=np.float32).tobytes()


def sample_proto(result: Any, target_layout: Any = None) -> bytes:
    p = pb()
    out = p.SampleResponse()
    for seq in result.sequences:
        s = out.sequences.add()
        s.stop_reason = p.STOP_REASON_STOP if seq.stop_reason == 'stop' else p.STOP_REASON_LENGTH
        s.tokens = np.asarray(seq.tokens, dtype=np.int32).tobytes()
        s.logprobs = np.asarray(seq.logprobs, dtype=np.float32).tobytes()
        if getattr(seq, 'topk', None) is not None:
            _topk_proto(s.topk_sampled_logprobs, seq.topk)
    if result.prompt_logprobs is not None:
        out.prompt_logprobs = np.asarray(result.prompt_logprobs, dtype=np.float32).tobytes()
    if getattr(result, 'topk_prompt', None) is not None:
        _topk_proto(out.topk_prompt_logprobs, result.topk_prompt)
    if getattr(result, 'target_prompt', None) is not None:
        scores = result.target_prompt
        if target_layout is None:
            _tensor_proto(out.target_prompt_logprobs, scores, p.DTYPE_FLOAT32)
        else:
            # The request's sparse layout, with the scores of exactly its listed cells.
            crow, col = target_layout
            msg = out.target_prompt_logprobs
            msg.dtype = p.DTYPE_FLOAT32
            msg.shape.extend(scores.shape)
            rows = np.repeat(np.arange(scores.shape[0]), np.diff(crow))
            msg.sparse_csr.values = scores[rows, col].astype(np.float32).tobytes()
            msg.sparse_csr.crow_indices = crow.astype(np.int64).tobytes()
            msg.sparse_csr.col_indices = col.astype(np.int64).tobytes()
    if getattr(result, 'alt_tokens', None) is not None:
        _tensor_proto(out.prompt_alt_tokens.tokens, result.alt_tokens[0], p.DTYPE_INT32)
        _tensor_proto(out.prompt_alt_tokens.logprobs, result.alt_tokens[1], p.DTYPE_FLOAT32)
    return out.SerializeToString()
