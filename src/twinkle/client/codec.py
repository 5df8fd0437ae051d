"""The value codec, as the client sees it (declared in ``twinkle.wire.codec``)."""
from __future__ import annotations

from ..wire.codec import (  # noqa: F401
                          TAGS,
                          CodecError,
                          Component,
                          DatasetMeta,
                          LoraConfig,
                          component,
                          decode,
                          decode_array,
                          encode,
                          encode_array,
)
