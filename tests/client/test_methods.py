"""One declaration drives the server routes and the client proxies: they cannot drift."""
from __future__ import annotations

import inspect

from twinkle.client import DataLoader, Dataset, TransformersModel
from twinkle.client.methods import CLASSES, DATALOADER, DATASET, MODEL
from twinkle.model import TwinkleModel
from twinkle.model.transformers.model import TransformersModel as LocalModel
from twinkle.runtime.remote import remote_methods


def test_model_table_covers_every_remote_function_and_the_abstract_api():
    declared = set(MODEL.methods)
    assert set(remote_methods(LocalModel)) <= declared
    abstract = {name for name, fn in inspect.getmembers(TwinkleModel, inspect.isfunction)
                if getattr(fn, '__isabstractmethod__', False)}
    assert abstract <= declared
    # Nothing declared that the local class lacks: the proxy mirrors a real API.
    assert all(callable(getattr(LocalModel, name, None)) for name in declared)


def test_server_implements_exactly_the_table():
    from twinkle.server.native_model import NativeModelHandle
    from twinkle.server.native_objects import BatchIterator, DataLoaderObject, DatasetObject
    implemented = {name[3:] for name in dir(NativeModelHandle) if name.startswith('do_')}
    assert implemented == set(MODEL.methods)
    for spec, cls in ((DATASET, DatasetObject), (DATALOADER, DataLoaderObject), (CLASSES['BatchIterator'],
                                                                               BatchIterator)):
        assert all(callable(getattr(cls, name, None)) for name in spec.methods), spec.name


def test_proxies_are_generated_from_the_table():
    for proxy, spec in ((TransformersModel, MODEL), (Dataset, DATASET), (DataLoader, DATALOADER)):
        for name in spec.methods:
            assert getattr(proxy, name).__name__ == name
        public = {n for n, v in vars(proxy).items() if callable(v) and not n.startswith('_')}
        assert public <= set(spec.methods)
