"""The value codec, as the client sees it (declared in ``twinkle.wire.codec``)."""
from __future__ import annotations

from ..wire.codec import (TAGS, CodecError, Component, DatasetMeta, LoraConfig, component, decode,  # noqa: F401
                          decode_array, encode, encode_array)
