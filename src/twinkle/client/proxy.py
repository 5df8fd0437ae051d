"""Proxy classes generated from the method table: ``TransformersModel``, ``Dataset``, ``DataLoader``.

Each proxy holds the id of an object that lives on the server; every declared method becomes a call.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Type

from ..wire import codec
from ..wire.methods import CLASSES, TAG_REF, Method, RemoteClass
from .http import TwinkleClient

_default_client: Optional[TwinkleClient] = None


def set_default_client(client: Optional[TwinkleClient]) -> None:
    global _default_client
    _default_client = client


def get_default_client() -> TwinkleClient:
    if _default_client is None:
        raise RuntimeError('no Twinkle server connection: call twinkle.init_twinkle_client(base_url, api_key) first, '
                           'or pass client=TwinkleClient(...)')
    return _default_client


class RemoteRef:
    """A handle to a server-side value (forward outputs, a loss); pass it back to the same server.

    ``summary`` holds the plain numbers the server attached (for a loss: ``loss``, ``num_items``).
    """

    def __init__(self, client: TwinkleClient, object_id: str, class_name: str, summary: Dict[str, Any]) -> None:
        self._client = client
        self._object_id = object_id
        self.class_name = class_name
        self.summary = summary

    def __getattr__(self, name: str) -> Any:
        summary = self.__dict__.get('summary') or {}
        if name in summary:
            return summary[name]
        raise AttributeError(f'{self.__dict__.get("class_name", "RemoteRef")} on the server has no attribute '
                             f'{name!r} here; available: {sorted(summary)}')

    def __repr__(self) -> str:
        return f'<remote {self.class_name} {self._object_id} {self.summary}>'


class RemoteObject:
    """Base of the generated proxies."""

    _remote: RemoteClass

    def __init__(self, *args: Any, client: Optional[TwinkleClient] = None, **kwargs: Any) -> None:
        client = client or get_default_client()
        kwargs.pop('remote_group', None)  # placement is the server's business
        reply = client.create(self._remote.name, _encode(list(args)), _encode(kwargs))
        self._bind(client, reply['object_id'], reply.get('info') or {})

    @classmethod
    def _attach(cls, client: TwinkleClient, object_id: str, info: Dict[str, Any]) -> 'RemoteObject':
        obj = cls.__new__(cls)
        obj._bind(client, object_id, info)
        return obj

    def _bind(self, client: TwinkleClient, object_id: str, info: Dict[str, Any]) -> None:
        self._client = client
        self._object_id = object_id
        self.remote_info = info

    def _call(self, method: Method, args: tuple, kwargs: Dict[str, Any]) -> Any:
        reply = self._client.call(self._object_id, method.name, _encode(list(args)), _encode(kwargs))
        if reply.get('stop'):
            raise StopIteration
        if method.returns == 'self':
            return self
        if method.returns == 'none':
            return None
        return codec.decode(reply.get('result'), {TAG_REF: lambda p: _make_ref(self._client, p)})

    def release(self) -> None:
        """Drop the server-side object (a model session releases its adapters)."""
        self._client.release(self._object_id)

    def __repr__(self) -> str:
        return f'<remote {self._remote.name} {self._object_id}>'


def _ref_of(value: Any) -> Optional[str]:
    if isinstance(value, (RemoteObject, RemoteRef)):
        return value._object_id
    return None


def _encode(value: Any) -> Any:
    return codec.encode(value, _ref_of)


def _make_ref(client: TwinkleClient, payload: Dict[str, Any]) -> Any:
    class_name = payload.get('class', '')
    proxy = PROXIES.get(class_name)
    if proxy is not None:
        return proxy._attach(client, payload['id'], payload.get('summary') or {})
    return RemoteRef(client, payload['id'], class_name, payload.get('summary') or {})


def _make_method(method: Method) -> Any:
    def call(self: RemoteObject, *args: Any, **kwargs: Any) -> Any:
        return self._call(method, args, kwargs)

    call.__name__ = method.name
    call.__doc__ = method.doc or f'Runs {method.name} on the server.'
    return call


def build_proxy(remote: RemoteClass) -> Type[RemoteObject]:
    namespace: Dict[str, Any] = {'_remote': remote, '__doc__': remote.doc, '__module__': __name__}
    for method in remote.methods.values():
        namespace[method.name] = _make_method(method)
    return type(remote.name, (RemoteObject,), namespace)


PROXIES: Dict[str, Type[RemoteObject]] = {name: build_proxy(spec) for name, spec in CLASSES.items()}
TransformersModel = PROXIES['TransformersModel']
Dataset = PROXIES['Dataset']
DataLoader = PROXIES['DataLoader']
BatchIterator = PROXIES['BatchIterator']
# A for-loop asks the iterator for __iter__ too.
BatchIterator.__iter__ = lambda self: self  # type: ignore[attr-defined]
