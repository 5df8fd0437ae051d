"""Context parallelism: the sequence of every sample split over the ranks of a ``cp`` group.

``sharding`` lays the sequence out zig-zag (load-balanced under a causal mask); ``ring`` is causal
ring attention over such shards with point-to-point key/value exchange (any backend with send/recv,
gloo included, so CPU too); ``seam`` wraps TransformersModel's forward core when the mesh has
``cp_size > 1`` (shard the batch, attend through the ring or, on CUDA, torch's context parallelism,
gather the log-probabilities).
"""
from .ring import ring_attention
from .sharding import check_length, chunk_ids, gather, positions, shard, unshard

__all__ = ['ring_attention', 'check_length', 'chunk_ids', 'gather', 'positions', 'shard', 'unshard']
