"""Errors shared across layers."""
from __future__ import annotations


class RemoteError(RuntimeError):
    """A call that ran somewhere else failed: on a rank of a Ray component
    (``twinkle.runtime.ray.WorkerError``) or on a Twinkle server (``twinkle.client.ServerError``)."""


__all__ = ['RemoteError']
