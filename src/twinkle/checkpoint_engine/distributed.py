"""DistributedCheckpointEngine: trainer weights broadcast to sampler processes with torch.distributed.

One sender (the trainer rank holding gathered weights) and any number of receivers (sampler processes)
share a process group. A sync is: one header (names, dtypes, shapes, adapter config) sent as a pickled
byte tensor, then the tensors packed into byte buckets of ``bucket_mb`` and broadcast one bucket at a
time, so neither side holds more than one bucket of extra memory. Receivers load every bucket of base
weights as it arrives and the (small) adapter at the end.

The group is either one of the current ``torch.distributed`` world (``group=None``: the default group,
e.g. ``torchrun`` with the trainer on rank 0 and samplers on the other ranks), or a private group built
by :meth:`DistributedCheckpointEngine.standalone` from a TCP rendezvous, for processes that already
belong to other worlds (Ray actor groups). gloo carries CPU tensors, nccl CUDA tensors.
"""
from __future__ import annotations

import datetime
import pickle
import time
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from twinkle.checkpoint_engine.base import CheckpointEngine
from twinkle.registry import register
from twinkle.sampler.weights import export_weights

Entry = Tuple[str, str, Tuple[int, ...], str]  # (name, dtype, shape, 'base' | 'adapter')


class _Channel:
    """Broadcast over a registered group (``dist.broadcast``) or a private ProcessGroup object."""

    def __init__(self, group: Any, src: int, private: bool) -> None:
        self.group, self.src, self.private = group, src, private

    @property
    def rank(self) -> int:
        return self.group.rank() if self.private else dist.get_rank(self.group)

    def broadcast(self, tensor: torch.Tensor) -> None:
        if self.private:
            opts = dist.BroadcastOptions()
            opts.rootRank = self.src
            opts.rootTensor = 0
            self.group.broadcast([tensor], opts).wait()
        else:
            dist.broadcast(tensor, group=self.group, group_src=self.src)


@register('checkpoint_engine')
class DistributedCheckpointEngine(CheckpointEngine):
    """Args:
        group: the process group holding the sender and every receiver (default: the default group).
        src: the sender's rank within ``group``.
        bucket_mb: the size of one broadcast bucket.
        device: where buckets live; default cuda for nccl groups, else cpu.
    """

    def __init__(self, group: Any = None, src: int = 0, bucket_mb: float = 64, device: Optional[Any] = None,
                 _private: bool = False) -> None:
        super().__init__()
        if bucket_mb <= 0:
            raise ValueError(f'bucket_mb must be > 0; got {bucket_mb}')
        if not _private and not dist.is_initialized():
            raise RuntimeError('DistributedCheckpointEngine needs torch.distributed initialised (run under torchrun '
                               'or call twinkle.initialize), or build one with DistributedCheckpointEngine.standalone')
        self.channel = _Channel(group if group is not None or _private else dist.group.WORLD, src, _private)
        self.bucket_bytes = int(bucket_mb * 2**20)
        if device is None:
            backend = self.group_backend()
            device = torch.device('cuda', torch.cuda.current_device()) if 'nccl' in backend else torch.device('cpu')
        self.device = torch.device(device)

    def group_backend(self) -> str:
        if self.channel.private:
            return type(self.channel.group).__name__.lower()
        return str(dist.get_backend(self.channel.group))

    @classmethod
    def standalone(cls, master_addr: str, master_port: int, rank: int, world_size: int,
                   backend: Optional[str] = None, src: int = 0, bucket_mb: float = 64,
                   timeout_s: float = 600) -> 'DistributedCheckpointEngine':
        """A private group of ``world_size`` processes meeting at ``master_addr:master_port`` (rank ``src``
        hosts the rendezvous store). Works inside processes that already have a torch.distributed world."""
        if not 0 <= rank < world_size:
            raise ValueError(f'rank {rank} is outside the group of {world_size}')
        backend = backend or ('nccl' if torch.cuda.is_available() else 'gloo')
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(master_addr, int(master_port), world_size, rank == src, timeout=timeout)
        group: Union[dist.ProcessGroupGloo, dist.ProcessGroupNCCL]
        if backend == 'gloo':
            group = dist.ProcessGroupGloo(store, rank, world_size, timeout)
            device = torch.device('cpu')
        elif backend == 'nccl':
            # torch's stub lists options as required; the binding defaults it.
            group = dist.ProcessGroupNCCL(store, rank, world_size)  # type: ignore[call-arg]
            device = torch.device('cuda', torch.cuda.current_device())
        else:
            raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (CUDA); got {backend!r}")
        return cls(group=group, src=src, bucket_mb=bucket_mb, device=device, _private=True)

    # ------------------------------------------------------------------ the protocol
    def sync(self, model: Any = None, sampler: Any = None, adapter_name: Optional[str] = None,
             full: Optional[bool] = None, sampler_adapter_name: Optional[str] = None) -> Dict[str, float]:
        """Every process of the group calls this: the sender with ``model``, receivers with ``sampler``."""
        if self.channel.rank == self.channel.src:
            if model is None:
                raise ValueError(f'rank {self.channel.src} sends the weights: pass model=')
            return self.send(model, adapter_name=adapter_name, full=full, sampler_adapter_name=sampler_adapter_name)
        if sampler is None:
            raise ValueError(f'rank {self.channel.rank} receives the weights: pass sampler=')
        return self.receive(sampler)

    def send(self, model: Any, adapter_name: Optional[str] = None, full: Optional[bool] = None,
             sampler_adapter_name: Optional[str] = None) -> Dict[str, float]:
        start = time.perf_counter()
        include_base = full if full is not None else (not self.trains_adapter(model) or not self._primed)
        base, adapter, config, name = export_weights(model, adapter_name, include_base=include_base)
        tensors = [(k, v, 'base') for k, v in base.items()] + [(k, v, 'adapter') for k, v in adapter.items()]
        entries: List[Entry] = [(k, str(v.dtype).replace('torch.', ''), tuple(v.shape), kind)
                                for k, v, kind in tensors]
        header = {'entries': entries, 'adapter_name': sampler_adapter_name or name,
                  'adapter_config': config.to_dict() if config is not None else None}
        self._send_object(header)
        for bucket in self._buckets(entries):
            buf = torch.empty(sum(_nbytes(entries[i]) for i in bucket), dtype=torch.uint8, device=self.device)
            offset = 0
            for i in bucket:
                data = tensors[i][1].detach().contiguous().view(-1).view(torch.uint8)
                buf[offset:offset + data.numel()].copy_(data, non_blocking=True)
                offset += data.numel()
            self.channel.broadcast(buf)
        if include_base:
            self._primed.add('receivers')
        return _stats(entries, start, bool(base))

    def receive(self, sampler: Any) -> Dict[str, float]:
        start = time.perf_counter()
        header = self._receive_object()
        entries: List[Entry] = header['entries']
        adapter: Dict[str, torch.Tensor] = {}
        has_base = False
        for bucket in self._buckets(entries):
            buf = torch.empty(sum(_nbytes(entries[i]) for i in bucket), dtype=torch.uint8, device=self.device)
            self.channel.broadcast(buf)
            base: Dict[str, torch.Tensor] = {}
            offset = 0
            for i in bucket:
                name, dtype, shape, kind = entries[i]
                n = _nbytes(entries[i])
                tensor = buf[offset:offset + n].view(getattr(torch, dtype)).view(shape)
                offset += n
                (base if kind == 'base' else adapter)[name] = tensor
            if base:
                sampler.load_weights(base)  # copies out of the bucket before it is reused
                has_base = True
        if adapter:
            sampler.load_weights({k: v.clone() for k, v in adapter.items()}, adapter_name=header['adapter_name'],
                                 adapter_config=header['adapter_config'])
        return _stats(entries, start, has_base)

    def _buckets(self, entries: List[Entry]) -> List[List[int]]:
        """Consecutive entries up to ``bucket_bytes`` each (a larger tensor gets a bucket of its own)."""
        buckets: List[List[int]] = []
        current: List[int] = []
        size = 0
        for i, entry in enumerate(entries):
            n = _nbytes(entry)
            if current and size + n > self.bucket_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += n
        if current:
            buckets.append(current)
        return buckets

    def _send_object(self, obj: Any) -> None:
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(self.device)
        self.channel.broadcast(torch.tensor([payload.numel()], dtype=torch.long, device=self.device))
        self.channel.broadcast(payload)

    def _receive_object(self) -> Any:
        size = torch.zeros(1, dtype=torch.long, device=self.device)
        self.channel.broadcast(size)
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        self.channel.broadcast(payload)
        return pickle.loads(payload.cpu().numpy().tobytes())


def _nbytes(entry: Entry) -> int:
    _, dtype, shape, _ = entry
    numel = 1
    for d in shape:
        numel *= d
    return numel * torch.empty((), dtype=getattr(torch, dtype)).element_size()


def _stats(entries: List[Entry], start: float, full: bool) -> Dict[str, float]:
    return {'sync_tensors': float(len(entries)), 'sync_mb': sum(_nbytes(e) for e in entries) / 2**20,
            'sync_seconds': time.perf_counter() - start, 'sync_full': float(full)}
