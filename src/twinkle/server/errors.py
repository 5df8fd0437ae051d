"""Errors the server answers with, and the scrubbing that keeps server paths and tracebacks private."""
from __future__ import annotations

import logging
import re
import uuid
from typing import Iterable, List, Optional, Tuple

logger = logging.getLogger('twinkle.server')


class ApiError(Exception):
    status = 400

    def __init__(self, message: str, status: Optional[int] = None, headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers = headers or {}


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    """A replayed id with another request: retrying cannot help, so the SDK is told not to."""
    status = 409

    def __init__(self, message: str, headers: Optional[dict] = None) -> None:
        super().__init__(message, headers={'x-should-retry': 'false', **(headers or {})})


class Gone(ApiError):
    status = 410


class TooLarge(ApiError):
    status = 413


class Unsupported(ApiError):
    status = 415


class TooMany(ApiError):
    status = 429


class LimitReached(TooMany):
    """A per-key cap that only the tenant's own release makes room under: waiting cannot help, so clients are
    told not to retry."""

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={'x-should-retry': 'false'})


# Exception types whose message describes a caller mistake (wrong argument, unknown name, bad data).
_USER_ERRORS = (ValueError, TypeError)


class Scrubber:
    """Removes server paths from messages: known roots first, then anything that looks like an absolute path."""

    _ABS_PATH = re.compile(r'(?<![\w:/>])/(?:[\w.\-@+]+/)+[\w.\-@+]*')

    def __init__(self, roots: Iterable[str] = ()) -> None:
        self.roots: List[str] = sorted({str(r) for r in roots if r and len(str(r)) > 1}, key=len, reverse=True)

    def add(self, root: str) -> None:
        if root and str(root) not in self.roots:
            self.roots.append(str(root))
            self.roots.sort(key=len, reverse=True)

    def __call__(self, message: str) -> str:
        for root in self.roots:
            message = message.replace(root, '<server>')
        return self._ABS_PATH.sub('<path>', message)


scrub = Scrubber()


def describe(exc: BaseException) -> Tuple[int, str, str]:
    """(HTTP status, message safe to show, category 'user' | 'server') for any exception."""
    if isinstance(exc, ApiError):
        return exc.status, scrub(exc.message), 'user' if exc.status < 500 else 'server'
    if isinstance(exc, _USER_ERRORS) or type(exc).__name__ in ('CheckpointError', 'RegistryError', 'HubError',
                                                                'CodecError', 'ValidationError'):
        text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        return 400, scrub(f'{type(exc).__name__}: {text}'), 'user'
    ref = uuid.uuid4().hex[:12]
    logger.exception('internal error %s', ref, exc_info=exc)
    return 500, f'internal server error (reference {ref}; the operator can find it in the server log)', 'server'
