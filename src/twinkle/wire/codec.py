"""JSON encoding of call arguments and results, shared by the client and the server.

Plain JSON values travel as they are; everything else is a one-key tagged dict (tags in
``methods.py``). Arrays are base64 bytes with dtype and shape, decoded to torch tensors where torch is
installed, numpy arrays where only numpy is, and nested lists otherwise: a thin client needs neither.
"""
from __future__ import annotations

import array
import base64
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from .methods import TAG_ARRAY, TAG_COMPONENT, TAG_DATASET_META, TAG_LORA, TAG_RANGE, TAG_REF, TAG_SLICE, TAG_TUPLE

# dtype name -> array-module type code (itemsize checked at import time below).
_TYPECODES = {'float32': 'f', 'float64': 'd', 'int64': 'q', 'int32': 'i', 'int16': 'h', 'int8': 'b',
              'uint8': 'B', 'bool': 'B'}
TAGS = (TAG_ARRAY, TAG_REF, TAG_LORA, TAG_DATASET_META, TAG_COMPONENT, TAG_RANGE, TAG_SLICE, TAG_TUPLE)


class CodecError(TypeError):
    """A value that cannot travel between client and server; the message says what to send instead."""


@dataclass
class LoraConfig:
    """A LoRA adapter description that needs no peft install (``peft.LoraConfig`` works too)."""
    r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: Any = 'all-linear'
    bias: str = 'none'
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {'r': self.r, 'lora_alpha': self.lora_alpha, 'lora_dropout': self.lora_dropout,
                'target_modules': self.target_modules, 'bias': self.bias, **self.extra}


@dataclass
class DatasetMeta:
    """The client's view of ``twinkle.dataset.DatasetMeta``: a hub id the server loads."""
    dataset_id: str
    subset_name: Optional[str] = None
    split: str = 'train'
    data_slice: Any = None
    columns: Optional[Dict[str, str]] = None


@dataclass
class Component:
    """A registered component built on the server: ``Component('preprocessor', 'SelfCognitionProcessor',
    'twinkle LLM', 'ModelScope community')``."""
    kind: str
    name: str
    args: Sequence[Any] = ()
    kwargs: Dict[str, Any] = field(default_factory=dict)


def component(kind: str, name: str, *args: Any, **kwargs: Any) -> Component:
    return Component(kind, name, list(args), dict(kwargs))


# ---------------------------------------------------------------------------------------------- arrays
def _module(name: str) -> Any:
    """An importable module, or None (also when a test has blocked it with sys.modules[name] = None)."""
    if name in sys.modules:
        return sys.modules[name]
    try:
        return __import__(name)
    except ImportError:
        return None


def encode_array(dtype: str, shape: Sequence[int], data: bytes) -> Dict[str, Any]:
    return {TAG_ARRAY: {'dtype': dtype, 'shape': list(shape), 'data': base64.b64encode(data).decode('ascii')}}


def _array_from_object(value: Any) -> Optional[Dict[str, Any]]:
    torch = sys.modules.get('torch')
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
            t = t.float()
        dtype = str(t.dtype).replace('torch.', '')
        if dtype not in _TYPECODES:
            raise CodecError(f'cannot send a tensor of dtype {t.dtype}; convert it to float32 or int64')
        return encode_array(dtype, list(t.shape), t.contiguous().numpy().tobytes())
    np = sys.modules.get('numpy')
    if np is not None and isinstance(value, np.ndarray):
        arr = value
        if arr.dtype == np.float16:
            arr = arr.astype(np.float32)
        dtype = str(arr.dtype)
        if dtype not in _TYPECODES:
            raise CodecError(f'cannot send an array of dtype {arr.dtype}; convert it to float32 or int64')
        return encode_array(dtype, list(arr.shape), np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder('<'))
                            .tobytes())
    if np is not None and isinstance(value, np.generic):
        return None
    return None


def decode_array(payload: Mapping[str, Any], prefer: str = 'auto') -> Any:
    """``prefer``: 'torch', 'numpy', 'list' or 'auto' (the richest that is installed)."""
    try:
        dtype, shape = str(payload['dtype']), [int(s) for s in payload['shape']]
        data = base64.b64decode(payload['data'], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise CodecError(f'malformed array (needs dtype, shape and base64 data): {exc}') from None
    if dtype not in _TYPECODES:
        raise CodecError(f'unsupported array dtype {dtype!r}; use one of {sorted(_TYPECODES)}')
    count = math.prod(shape) if shape else 1
    itemsize = array.array(_TYPECODES[dtype]).itemsize
    if len(data) != count * itemsize or any(s < 0 for s in shape):
        raise CodecError(f'array data has {len(data)} bytes; shape {shape} of {dtype} needs {count * itemsize}')
    torch = _module('torch') if prefer in ('auto', 'torch') else None
    np = _module('numpy') if prefer in ('auto', 'torch', 'numpy') else None
    if np is not None:
        arr = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder('<')).astype(dtype).reshape(shape)
        if torch is not None:
            return torch.from_numpy(arr.copy())
        return arr.copy()
    flat = array.array(_TYPECODES[dtype], data)
    if sys.byteorder != 'little':
        flat.byteswap()
    values: List[Any] = [bool(v) for v in flat] if dtype == 'bool' else flat.tolist()
    return _reshape(values, shape)


def _reshape(flat: List[Any], shape: List[int]) -> Any:
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return flat
    step = math.prod(shape[1:])
    return [_reshape(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


# ---------------------------------------------------------------------------------------------- encode
def encode(value: Any, ref_of: Optional[Callable[[Any], Optional[str]]] = None, _path: str = 'value') -> Any:
    """Turn ``value`` into JSON-able data. ``ref_of(obj)`` returns the object id of a remote proxy."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if ref_of is not None:
        ref = ref_of(value)
        if ref is not None:
            return {TAG_REF: ref}
    arr = _array_from_object(value)
    if arr is not None:
        return arr
    np = sys.modules.get('numpy')
    if np is not None and isinstance(value, np.generic):
        return value.item()
    if isinstance(value, range):
        return {TAG_RANGE: [value.start, value.stop, value.step]}
    if isinstance(value, slice):
        return {TAG_SLICE: [value.start, value.stop, value.step]}
    if isinstance(value, Component):
        return {TAG_COMPONENT: {'kind': value.kind, 'name': value.name,
                                'args': encode(list(value.args), ref_of, f'{_path}.args'),
                                'kwargs': encode(dict(value.kwargs), ref_of, f'{_path}.kwargs')}}
    cls = type(value).__name__
    if cls == 'LoraConfig' and hasattr(value, 'to_dict'):
        return {TAG_LORA: encode(_lora_dict(value), ref_of, _path)}
    if cls == 'DatasetMeta' and hasattr(value, 'dataset_id'):
        fields = {k: getattr(value, k, None) for k in ('dataset_id', 'subset_name', 'split', 'data_slice', 'columns')}
        return {TAG_DATASET_META: encode(fields, ref_of, _path)}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CodecError(f'{_path} has a key {k!r} of type {type(k).__name__}; only string keys can be sent')
            if k in TAGS:
                raise CodecError(f'{_path} uses the reserved key {k!r}')
            out[k] = encode(v, ref_of, f'{_path}[{k!r}]')
        return out
    if isinstance(value, tuple):
        return {TAG_TUPLE: [encode(v, ref_of, f'{_path}[{i}]') for i, v in enumerate(value)]}
    if isinstance(value, (list, set, frozenset)):
        return [encode(v, ref_of, f'{_path}[{i}]') for i, v in enumerate(value)]
    raise CodecError(f'{_path} is a {cls}, which cannot be sent to the server. Send plain data (numbers, '
                     f'strings, lists, dicts, tensors/arrays), a LoraConfig, a DatasetMeta, or a registered component '
                     f"by name: twinkle.client.component('preprocessor', '{cls}', ...)")


def _lora_dict(config: Any) -> Dict[str, Any]:
    raw = config.to_dict()
    core = ('r', 'lora_alpha', 'lora_dropout', 'target_modules', 'bias')
    try:  # send only what differs from the config class's defaults (peft adds many fields)
        defaults = type(config)().to_dict()
    except Exception:
        defaults = {}
    keep = {}
    for key, val in raw.items():
        if key not in core and key in defaults and defaults[key] == val:
            continue
        if val is None or key.startswith('_') or key in ('peft_type', 'task_type', 'base_model_name_or_path',
                                                         'revision', 'inference_mode', 'auto_mapping'):
            continue
        if isinstance(val, (set, frozenset)):
            val = sorted(val)
        if isinstance(val, (str, int, float, bool, list, tuple, dict)):
            keep[key] = list(val) if isinstance(val, tuple) else val
    return keep


# ---------------------------------------------------------------------------------------------- decode
Hook = Callable[[Any], Any]


def decode(value: Any, hooks: Optional[Mapping[str, Hook]] = None, prefer: str = 'auto') -> Any:
    """Inverse of ``encode``. ``hooks[tag](payload)`` overrides how a tag is rebuilt."""
    hooks = hooks or {}
    if isinstance(value, list):
        return [decode(v, hooks, prefer) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, payload), = value.items()
        if tag in hooks:
            return hooks[tag](payload)
        if tag == TAG_ARRAY:
            return decode_array(payload, prefer)
        if tag == TAG_TUPLE:
            return tuple(decode(v, hooks, prefer) for v in _as_list(payload, tag))
        if tag == TAG_RANGE:
            return range(*[int(x) for x in _as_list(payload, tag)])
        if tag == TAG_SLICE:
            return slice(*_as_list(payload, tag))
        if tag == TAG_LORA:
            return LoraConfig(**_lora_fields(decode(payload, hooks, prefer)))
        if tag == TAG_DATASET_META:
            return DatasetMeta(**decode(payload, hooks, prefer))
        if tag == TAG_COMPONENT:
            p = decode(payload, hooks, prefer)
            return Component(p['kind'], p['name'], p.get('args', []), p.get('kwargs', {}))
        if tag in TAGS:
            raise CodecError(f'{tag} is not accepted here')
    return {k: decode(v, hooks, prefer) for k, v in value.items()}


def _as_list(payload: Any, tag: str) -> list:
    if not isinstance(payload, list):
        raise CodecError(f'{tag} must hold a list, got {type(payload).__name__}')
    return payload


def _lora_fields(d: Mapping[str, Any]) -> Dict[str, Any]:
    known = ('r', 'lora_alpha', 'lora_dropout', 'target_modules', 'bias')
    out = {k: d[k] for k in known if k in d}
    out['extra'] = {k: v for k, v in d.items() if k not in known}
    return out
