"""Server-side objects of the native API: the per-tenant object table and the data components.

Data components run in a thread pool, not on the model worker. They only read hub datasets
(``builtin://``, ``hf://``, ``ms://``) or rows sent inline: a client never names a server path.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional

from ..wire import codec
from ..wire.methods import TAG_COMPONENT, TAG_REF
from .config import Limits
from .errors import BadRequest, Forbidden, LimitReached, NotFound

HUB_SCHEMES = ('builtin://', 'hf://', 'ms://')
# Component kinds a client may build by name on the server (all resolve through twinkle.registry).
COMPONENT_KINDS = ('preprocessor', 'filter', 'loss', 'metric', 'template', 'processor')
TRANSIENT_PER_TENANT = 32


@dataclass
class Entry:
    object_id: str
    tenant: str
    class_name: str
    obj: Any
    transient: bool
    created: float = field(default_factory=time.monotonic)


class ObjectTable:
    """Objects of all tenants by id; a tenant sees only its own (others answer 404)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.entries: Dict[str, Entry] = {}

    def add(self, tenant: str, class_name: str, obj: Any, transient: bool = False) -> Entry:
        mine = [e for e in self.entries.values() if e.tenant == tenant]
        if transient:
            old = sorted((e for e in mine if e.transient), key=lambda e: e.created)
            for e in old[:max(0, len(old) - TRANSIENT_PER_TENANT + 1)]:
                self.entries.pop(e.object_id, None)
        elif sum(1 for e in mine if not e.transient) >= self.limits.max_objects_per_tenant:
            raise LimitReached(f'this API key holds {self.limits.max_objects_per_tenant} server objects '
                               f'(limits.max_objects_per_tenant); release some (obj.release()) first')
        entry = Entry('o' + uuid.uuid4().hex[:20], tenant, class_name, obj, transient)
        self.entries[entry.object_id] = entry
        return entry

    def mine(self, tenant: str) -> List[Entry]:
        return [e for e in list(self.entries.values()) if e.tenant == tenant]

    def get(self, tenant: str, object_id: Any) -> Entry:
        entry = self.entries.get(object_id) if isinstance(object_id, str) else None
        if entry is None or entry.tenant != tenant:
            raise NotFound(f'object {object_id!r} not found (released, expired, or not yours)')
        return entry

    def remove(self, tenant: str, object_id: str) -> Entry:
        entry = self.get(tenant, object_id)
        del self.entries[object_id]
        return entry


def decode_args(value: Any, table: ObjectTable, tenant: str) -> Any:
    """Decode call arguments: arrays become tensors, refs the tenant's objects, components built by name."""
    def ref(payload: Any) -> Any:
        return table.get(tenant, payload).obj

    def comp(payload: Any) -> Any:
        spec = codec.decode(payload, {TAG_REF: ref, TAG_COMPONENT: comp}, prefer='torch')
        return build_component(spec.get('kind'), spec.get('name'), spec.get('args') or [], spec.get('kwargs') or {})

    return codec.decode(value, {TAG_REF: ref, TAG_COMPONENT: comp}, prefer='torch')


def build_component(kind: Any, name: Any, args: List[Any], kwargs: Mapping[str, Any]) -> Any:
    from ..registry import resolve
    if kind not in COMPONENT_KINDS or not isinstance(name, str):
        raise BadRequest(f'component kind {kind!r} cannot be built on the server; allowed kinds: {COMPONENT_KINDS}')
    obj = resolve(kind, name)
    if not isinstance(obj, type):
        raise BadRequest(f'{kind} {name!r} is not a class')
    if kind == 'template':
        raise BadRequest("templates are chosen with set_template('Name', ...)")
    return obj(*args, **dict(kwargs))


def _meta(meta: Any) -> Any:
    from ..dataset import DatasetMeta
    if isinstance(meta, codec.DatasetMeta):
        if not isinstance(meta.dataset_id, str) or not meta.dataset_id.startswith(HUB_SCHEMES):
            raise BadRequest(f'dataset_id {meta.dataset_id!r}: the server loads hub datasets only '
                             f'({", ".join(HUB_SCHEMES)}); send local rows with Dataset(data=[...])')
        return DatasetMeta(meta.dataset_id, meta.subset_name, meta.split, meta.data_slice, meta.columns)
    raise BadRequest(f'dataset_meta must be a DatasetMeta, got {type(meta).__name__}')


class DatasetObject:
    """A ``twinkle.dataset.Dataset`` built from hub ids or inline rows."""

    def __init__(self, dataset_meta: Any = None, *, data: Optional[List[Dict[str, Any]]] = None, mix: str = 'concat',
                 ratios: Any = None, seed: int = 42, stopping_strategy: str = 'first_exhausted',
                 model_dir: Optional[str] = None, served: tuple = ()) -> None:
        from ..dataset import Dataset
        metas = None
        if dataset_meta is not None:
            metas = [_meta(m) for m in dataset_meta] if isinstance(dataset_meta, list) else _meta(dataset_meta)
        self.model_dir = model_dir
        self.served = served
        self.dataset = Dataset(metas, data=data, mix=mix, ratios=ratios, seed=seed,
                               stopping_strategy=stopping_strategy)

    def map(self, preprocessor: Any, num_proc: int = 1, **kwargs: Any) -> None:
        self.dataset.map(_named(preprocessor, 'preprocessor'), **kwargs)

    def filter(self, filter: Any, num_proc: int = 1, **kwargs: Any) -> None:  # noqa: A002 - mirrors Dataset
        self.dataset.filter(_named(filter, 'filter'), **kwargs)

    def set_template(self, template: Any, model_id: Optional[str] = None, **kwargs: Any) -> None:
        if not isinstance(template, str):
            raise BadRequest('set_template takes a registered template name (e.g. "Template")')
        if 'tokenizer' in kwargs:
            raise BadRequest('set_template: tokenizer= is not accepted on the server; pass model_id (a hub id)')
        if model_id is not None and not isinstance(model_id, str):
            raise BadRequest(f'set_template: model_id must be a string (the served model or a hub id), got '
                             f'{model_id!r}')
        if model_id is None or model_id in self.served:
            model_id = self.model_dir
        elif not model_id.startswith(HUB_SCHEMES):
            raise BadRequest(f'model_id {model_id!r}: use the served model, or a hub id ({", ".join(HUB_SCHEMES)})')
        self.dataset.set_template(template, model_id=model_id, **kwargs)

    def encode(self, num_proc: int = 1, cache: bool = True) -> None:
        self.dataset.encode(cache=cache)

    def pack(self, max_length: Optional[int] = None) -> None:
        self.dataset.pack(max_length)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        if isinstance(index, bool) or not isinstance(index, int):
            raise BadRequest('remote datasets are indexed by an int')
        size = len(self.dataset)
        if not -size <= index < size:
            raise BadRequest(f'index {index} is out of range for a dataset of {size} rows')
        return self.dataset[index]

    def column_names(self) -> List[str]:
        return self.dataset.column_names

    def stats(self) -> Dict[str, int]:
        return dict(self.dataset.stats)

    def add_dataset(self, dataset_meta: Any, **kwargs: Any) -> None:
        self.dataset.add_dataset(_meta(dataset_meta), **kwargs)

    def mix_dataset(self, interleave: bool = True, ratios: Any = None, seed: Optional[int] = None,
                    stopping_strategy: Optional[str] = None) -> None:
        self.dataset.mix_dataset(interleave=interleave, ratios=ratios, seed=seed, stopping_strategy=stopping_strategy)

    def save_as(self, *args: Any, **kwargs: Any) -> None:
        raise Forbidden('save_as is refused on a shared server: it would write files on the server. Read the rows '
                        '(dataset[i]) and save them on the client')

    def flush_save(self) -> None:
        self.save_as()


def _named(component: Any, kind: str) -> Any:
    if isinstance(component, str):
        return component
    if callable(component) and type(component).__module__.startswith('twinkle.'):
        return component  # built from a registered name by decode_args
    raise BadRequest(f'{kind} must be a registered name or twinkle.client.component({kind!r}, name, ...)')


class DataLoaderObject:

    def __init__(self, dataset: Any, batch_size: int, min_batch_size: Optional[int] = None, shuffle: bool = False,
                 seed: int = 42, drop_last: bool = False, **ignored: Any) -> None:
        from ..dataloader import DataLoader
        if not isinstance(dataset, DatasetObject):
            raise BadRequest('DataLoader(dataset=...) takes a remote Dataset created on this server')
        unknown = sorted(set(ignored) - {'num_workers', 'device_mesh', 'dp_rank', 'collate_fn'})
        if unknown:
            raise BadRequest(f'DataLoader options {unknown} are not accepted by the server')
        self.loader = DataLoader(dataset.dataset, batch_size=batch_size, min_batch_size=min_batch_size,
                                 shuffle=shuffle, seed=seed, drop_last=drop_last, dp_rank=0)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> 'BatchIterator':
        return BatchIterator(iter(self.loader))

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def get_state(self) -> Dict[str, int]:
        return self.loader.get_state()

    def resume_from_checkpoint(self, consumed_train_samples: Any) -> None:
        self.loader.resume_from_checkpoint(consumed_train_samples)

    def skip_consumed_samples(self, consumed_train_samples: int) -> None:
        self.loader.skip_consumed_samples(consumed_train_samples)

    def set_processor(self, processor: Any, **kwargs: Any) -> None:
        if not isinstance(processor, str):
            raise BadRequest('set_processor takes a registered processor name (e.g. "InputProcessor")')
        self.loader.set_processor(processor, **kwargs)


class BatchIterator:

    def __init__(self, it: Iterator[Any]) -> None:
        self.it = it

    def __next__(self) -> Any:
        return next(self.it)
