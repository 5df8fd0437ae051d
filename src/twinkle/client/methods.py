"""The remote method table, as the client sees it (declared in ``twinkle.wire.methods``)."""
from __future__ import annotations

from ..wire.methods import (  # noqa: F401
                            API_PREFIX,
                            CLASSES,
                            CONSTRUCTIBLE,
                            DATALOADER,
                            DATASET,
                            EXECUTORS,
                            ITERATOR,
                            MODEL,
                            RETURNS,
                            TAG_ARRAY,
                            TAG_COMPONENT,
                            TAG_DATASET_META,
                            TAG_LORA,
                            TAG_RANGE,
                            TAG_REF,
                            TAG_SLICE,
                            TAG_TUPLE,
                            Method,
                            RemoteClass,
)
