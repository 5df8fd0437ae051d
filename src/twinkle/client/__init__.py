"""The Twinkle client: the same classes as local training, running on a Twinkle server.

``init_twinkle_client(base_url, api_key)`` connects; afterwards ``TransformersModel(...,
remote_group=...)`` from ``twinkle.model`` builds a proxy of a server-side model, and the classes here
(``TransformersModel``, ``Dataset``, ``DataLoader``) are proxies whatever the arguments. Works without
torch or transformers installed: ``pip install ./clients/python`` installs the ``twinkle-client``
distribution (these modules and httpx only); keep this package's imports free of torch.
"""
from __future__ import annotations

from typing import Any, Optional

from ..wire.codec import Component, DatasetMeta, LoraConfig, component
from ..wire.methods import CONSTRUCTIBLE
from .http import RemoteError, ServerError, TwinkleClient
from .proxy import (
    DataLoader,
    Dataset,
    RemoteObject,
    RemoteRef,
    TransformersModel,
    get_default_client,
    set_default_client,
)

__all__ = ['init_twinkle_client', 'TwinkleClient', 'RemoteError', 'ServerError', 'TransformersModel', 'Dataset',
           'DataLoader', 'DatasetMeta', 'LoraConfig', 'Component', 'component', 'RemoteObject', 'RemoteRef',
           'get_default_client']


def init_twinkle_client(base_url: str, api_key: str, timeout: float = 600.0, check: bool = True) -> TwinkleClient:
    """Connect to a Twinkle server and make it the default for proxies.

    Also installs the construction hook of ``@remote_class`` classes, so that
    ``twinkle.model.TransformersModel(model_id=..., remote_group='default')`` returns a proxy.
    ``check`` asks ``/api/v1/healthz`` once, so a wrong address fails here rather than at the first call.
    """
    client = TwinkleClient(base_url, api_key, timeout=timeout)
    if check:
        client.health()
    set_default_client(client)
    _install_construct_hook()
    return client


def _install_construct_hook() -> None:
    from ..runtime import remote

    def hook(cls: type, group: str, args: tuple, kwargs: dict) -> Optional[Any]:
        for klass in cls.__mro__:
            if klass.__name__ in CONSTRUCTIBLE:
                from .proxy import PROXIES
                return PROXIES[klass.__name__](*args, **kwargs)
        return None

    remote.set_construct_hook(hook)
