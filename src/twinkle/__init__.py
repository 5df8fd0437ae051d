"""Twinkle: components for training large language models with PyTorch.

``import twinkle`` stays cheap: torch is imported only when something needs it.
"""
from __future__ import annotations

from twinkle.mesh import DeviceGroup, DeviceMesh
from twinkle.platform import Platform
from twinkle.runtime import initialize
from twinkle.runtime.remote import remote_class, remote_function

try:
    from importlib.metadata import PackageNotFoundError, version as _version
    __version__ = _version('twinkle')
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = '0.1.0'

__all__ = ['initialize', 'DeviceMesh', 'DeviceGroup', 'Platform', 'remote_class', 'remote_function', '__version__']


def __getattr__(name: str):
    # The client is imported on first use only: it needs httpx, which local training does not.
    if name == 'init_twinkle_client':
        from twinkle.client import init_twinkle_client
        return init_twinkle_client
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
