"""DataLoader: global batches of a dataset, each data-parallel rank receiving only its own slice.

``batch_size`` is the global batch: the samples one optimizer step sees across all data-parallel
ranks. Every rank walks the same sequence of global batches (the order depends only on ``seed`` and
the epoch), and takes the contiguous chunk ``[dp_rank * per_rank, (dp_rank + 1) * per_rank)`` of
each, so the ranks' slices are disjoint and together form the global batch.

The position is one number, ``consumed_train_samples`` (global samples yielded so far, across
epochs): the epoch and the offset inside it follow from it, so resuming from a checkpoint replays
exactly the batches an uninterrupted run would have produced, on any rank.

Like ``torch.utils.data.DataLoader``, every new ``iter()`` starts a new epoch: iterating again after
a ``break`` does not continue the unfinished epoch but starts the next one (with its own shuffle
order). The samples the unfinished epoch left unread then count as consumed, so that
``consumed_train_samples`` stays the run's position (a checkpoint taken later resumes where it was
taken). The one exception is the first iteration after ``resume_from_checkpoint`` (or
``set_epoch``), which starts exactly at the position given, mid-epoch after a resume.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Sized, Tuple, Union

import torch

from twinkle.runtime import context
from twinkle.runtime.remote import remote_class

logger = logging.getLogger(__name__)


def _context_mesh() -> Any:
    try:
        from twinkle.runtime.context import get_device_mesh, get_mode
    except ImportError:
        return None
    if get_mode() == 'ray':
        # The Ray driver hands whole global batches to remote components, whose handles slice them
        # by data-parallel rank; inside the ranks (mode 'local') the mesh applies as under torchrun.
        return None
    return get_device_mesh()


def _data_world_size(mesh: Any) -> int:
    # Ranks of one sequence-parallel group share a sample, so the number of distinct slices is the
    # mesh's data world size where it has one.
    size = getattr(mesh, 'data_world_size', None)
    return int(size if size is not None else mesh.dp_world_size)


def _data_rank_of(mesh: Any, rank: int) -> int:
    fn = getattr(mesh, 'data_rank_of', None)
    return int(fn(rank) if fn is not None else mesh.dp_rank_of(rank))


def _is_indexable(dataset: Any) -> bool:
    return hasattr(dataset, '__len__') and hasattr(dataset, '__getitem__')


def split_for_rank(size: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of ``rank``'s contiguous share of ``size`` items; shares differ by at most one."""
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def fetch(dataset: Any, index: int, max_retries: int = 0) -> Any:
    """``dataset[index]``; with ``max_retries``, a row that fails to load is replaced by the next ones
    (``index + 1``, ``index + 2``, ... wrapping around), trying at most ``max_retries`` of them."""
    try:
        return dataset[index]
    except Exception as first:
        if max_retries <= 0:
            raise
        n = len(dataset)
        for k in range(1, max_retries + 1):
            other = (index + k) % n
            try:
                sample = dataset[other]
            except Exception:
                continue
            logger.warning('DataLoader: sample %d failed to load (%s: %s); using sample %d instead', index,
                           type(first).__name__, first, other)
            return sample
        raise RuntimeError(f'DataLoader: sample {index} and the {max_retries} samples after it all failed to load; '
                           f'the first error is above') from first


class _BatchFetch(torch.utils.data.Dataset):
    """Item k = the samples of this rank's k-th batch, fetched (and collated) inside a worker."""

    def __init__(self, dataset: Any, batches: List[List[int]], collate_fn: Optional[Callable],
                 max_retries: int = 0) -> None:
        self.dataset, self.batches, self.collate_fn, self.max_retries = dataset, batches, collate_fn, max_retries

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> Any:
        samples = [fetch(self.dataset, i, self.max_retries) for i in self.batches[k]]
        return self.collate_fn(samples) if self.collate_fn is not None else samples


def _identity(x: Any) -> Any:
    return x


@remote_class
class DataLoader:
    """Iterate a dataset in global batches; yield this data-parallel rank's slice of each.

    Args:
        dataset: anything with ``len`` and integer indexing (a twinkle ``Dataset``, a list of dicts), or
            an iterable (streaming) dataset.
        batch_size: the global batch size; must be divisible by the data-parallel size.
        min_batch_size: a trailing global batch smaller than this is dropped (and counted in
            ``dropped_samples``). Default: the data-parallel size, so every rank gets a sample.
        shuffle: a fresh permutation per epoch from a ``torch.Generator`` seeded with ``seed + epoch``.
        drop_last: drop any trailing global batch smaller than ``batch_size``.
        num_workers: fetch (and collate) batches in that many worker processes; same batches as 0.
        device_mesh: the mesh that defines data-parallel ranks; default: the runtime's mesh, if any.
        dp_rank: this process's data-parallel rank; default: the mesh's for env ``RANK`` (0 if unset).
        collate_fn: applied to each rank-local list of samples (e.g. an ``InputProcessor``); see also
            ``set_processor``.
        sampler: the order of one epoch (a ``torch.utils.data.Sampler`` or any iterable of indices, read
            anew every epoch; its ``set_epoch`` is called when it has one) instead of ``shuffle``. Its
            length is the epoch's size (e.g. ``RandomSampler(..., num_samples=k)``).
        max_retries: a sample that fails to load is replaced by one of the next ``max_retries`` samples
            (with a warning); 0 (default) raises the error.

    ``dataset`` may also be a function returning the dataset, called once here.

    Each ``iter()`` starts a new epoch, as with ``torch.utils.data.DataLoader``: after a ``break``,
    iterating again begins the next epoch, and the rest of the abandoned epoch counts as consumed
    (a streaming dataset reads that rest once, without yielding it, to count it). The first
    iteration after ``resume_from_checkpoint`` continues mid-epoch where the checkpoint was taken,
    once; ``set_epoch(e)`` makes the next iteration start at the beginning of epoch ``e``.
    """

    def __init__(self, dataset: Any, batch_size: int, min_batch_size: Optional[int] = None, shuffle: bool = False,
                 seed: int = 42, drop_last: bool = False, num_workers: int = 0, device_mesh: Any = None,
                 dp_rank: Optional[int] = None, collate_fn: Optional[Callable[[List[Any]], Any]] = None,
                 sampler: Optional[Iterable[int]] = None, max_retries: int = 0) -> None:
        if callable(dataset) and not _is_indexable(dataset) and not hasattr(dataset, '__iter__'):
            dataset = dataset()  # a factory, e.g. so that each remote worker builds its own dataset
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f'max_retries must be an int >= 0, got {max_retries!r}')
        self.max_retries = max_retries
        if sampler is not None and shuffle:
            raise ValueError('give shuffle=True or a sampler, not both: the sampler decides the order')
        self.sampler = sampler
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f'batch_size must be a positive int (the global batch), got {batch_size!r}')
        mesh = device_mesh if device_mesh is not None else _context_mesh()
        self.device_mesh = mesh
        self.dp_world_size = _data_world_size(mesh) if mesh is not None else 1
        if dp_rank is None:
            dp_rank = _data_rank_of(mesh, context.rank()) if mesh is not None else 0
        if not 0 <= dp_rank < self.dp_world_size:
            raise ValueError(f'dp_rank={dp_rank} is outside 0..{self.dp_world_size - 1} '
                             f'(data-parallel size {self.dp_world_size})')
        self.dp_rank = dp_rank
        if batch_size % self.dp_world_size:
            raise ValueError(f'batch_size={batch_size} (the global batch) is not divisible by the data-parallel '
                             f'size {self.dp_world_size}; use a multiple of {self.dp_world_size}')
        if min_batch_size is None:
            min_batch_size = self.dp_world_size
        if not self.dp_world_size <= min_batch_size <= batch_size:
            raise ValueError(f'min_batch_size={min_batch_size} must lie between the data-parallel size '
                             f'{self.dp_world_size} (every rank needs a sample) and batch_size={batch_size}')
        if num_workers < 0:
            raise ValueError(f'num_workers must be >= 0, got {num_workers}')
        self.dataset = dataset
        self.batch_size = batch_size
        self.min_batch_size = min_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.streaming = not _is_indexable(dataset)
        if self.streaming:
            if not hasattr(dataset, '__iter__'):
                raise TypeError(f'DataLoader needs a dataset with len() and indexing, or an iterable; '
                                f'got {type(dataset).__name__}')
            if shuffle:
                raise ValueError('shuffle=True needs an indexable dataset; shuffle a streaming dataset itself '
                                 '(e.g. a shuffle buffer) before passing it')
            if num_workers:
                raise ValueError('num_workers > 0 needs an indexable dataset; a streaming dataset is read in '
                                 'the main process')
            if sampler is not None:
                raise ValueError('sampler= needs an indexable dataset; a streaming dataset is read in its own order')
        self._epoch = 0
        self._offset = 0  # global samples of the current epoch already yielded
        self._consumed = 0
        # True while the next pass must start exactly at (_epoch, _offset): set by construction,
        # set_epoch and resume; a pass that begins clears it, so a later iter() starts a new epoch.
        self._positioned = True
        self._live: Optional[Iterator[Any]] = None  # the stream of a streaming pass still open
        self.dropped_samples = 0

    # -- sizes ---------------------------------------------------------------------------------
    def _keeps_tail(self, size: int) -> bool:
        return size == self.batch_size or (size > 0 and not self.drop_last and size >= self.min_batch_size)

    def _samples_per_epoch(self, n: int) -> int:
        full, rest = divmod(n, self.batch_size)
        return full * self.batch_size + (rest if self._keeps_tail(rest) else 0)

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError('len() of a DataLoader over a streaming dataset is unknown: the number of samples is '
                            'only known once the stream is read; count steps yourself or use an indexable dataset')
        return -(-self._samples_per_epoch(self._epoch_size()) // self.batch_size)

    def _epoch_size(self) -> int:
        return len(self.sampler) if isinstance(self.sampler, Sized) else len(self.dataset)

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of ``epoch`` (its own shuffle order)."""
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f'set_epoch: epoch must be >= 0, got {epoch}')
        self._epoch, self._offset = epoch, 0
        self._positioned, self._live = True, None
        if not self.streaming:
            # keep the counter the position, so that a checkpoint taken later resumes here
            self._consumed = epoch * self._samples_per_epoch(self._epoch_size())

    # -- state ---------------------------------------------------------------------------------
    def get_state(self) -> Dict[str, int]:
        """``{'consumed_train_samples': n}``: the position to pass to ``resume_from_checkpoint``."""
        return {'consumed_train_samples': self._consumed}

    def resume_from_checkpoint(self, consumed_train_samples: Union[int, Dict[str, int]]) -> None:
        """Continue after ``consumed_train_samples`` global samples (as saved by ``get_state``)."""
        if isinstance(consumed_train_samples, dict):
            consumed_train_samples = consumed_train_samples['consumed_train_samples']
        consumed = int(consumed_train_samples)
        if consumed < 0:
            raise ValueError(f'consumed_train_samples must be >= 0, got {consumed}')
        self._consumed = consumed
        self._positioned, self._live = True, None
        if self.streaming:
            # Epoch lengths of a stream are unknown until read: iteration skips forward across epochs.
            self._epoch, self._offset = 0, consumed
            return
        per_epoch = self._samples_per_epoch(self._epoch_size())
        if per_epoch == 0:
            self._epoch, self._offset = 0, 0
            return
        self._epoch, self._offset = divmod(consumed, per_epoch)

    def skip_consumed_samples(self, consumed_train_samples: int) -> None:
        """Skip the first ``consumed_train_samples`` global samples (the same as ``resume_from_checkpoint``)."""
        self.resume_from_checkpoint(consumed_train_samples)

    def set_processor(self, processor: Any, **kwargs: Any) -> 'DataLoader':
        """Collate every batch with ``processor``: an ``InputProcessor`` (instance, class or registered
        name, built with ``kwargs``) or any function of a list of samples."""
        from twinkle.registry import build
        obj = build('processor', processor, kwargs, 'set_processor')
        if not callable(obj):
            raise ValueError(f'set_processor takes a callable (list of samples -> batch), got {type(obj).__name__}')
        self.collate_fn = obj
        return self

    # -- iteration -----------------------------------------------------------------------------
    def _order(self, epoch: int, n: int) -> List[int]:
        if self.sampler is not None:
            set_epoch = getattr(self.sampler, 'set_epoch', None)
            if callable(set_epoch):
                set_epoch(epoch)
            order = [int(i) for i in self.sampler]
            bad = [i for i in order if not 0 <= i < n]
            if bad:
                raise ValueError(f'the sampler gave index {bad[0]}, outside the dataset of {n} samples')
            return order
        if not self.shuffle:
            return list(range(n))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(n, generator=generator).tolist()

    def _rank_slice(self, items: Sequence[Any]) -> List[Any]:
        start, end = split_for_rank(len(items), self.dp_world_size, self.dp_rank)
        return list(items[start:end])

    def _drop(self, size: int, epoch: int) -> None:
        self.dropped_samples += size
        why = 'drop_last=True' if self.drop_last else f'fewer than min_batch_size={self.min_batch_size}'
        logger.info('DataLoader: dropped the last %d samples of epoch %d (%s)', size, epoch, why)

    def _advance(self, global_size: int) -> None:
        # Before the batch is handed out, so a checkpoint saved after training on it counts it.
        self._offset += global_size
        self._consumed += global_size

    def __iter__(self) -> Iterator[Any]:
        return self._iter_stream() if self.streaming else self._iter_indexed()

    def _next_epoch_after(self, epoch_samples: int) -> None:
        # The current epoch is left unfinished: what it had left counts as consumed (the position).
        self._consumed += max(0, epoch_samples - self._offset)
        self._epoch, self._offset = self._epoch + 1, 0

    def _iter_indexed(self) -> Iterator[Any]:
        n = len(self.dataset)
        per_epoch = self._samples_per_epoch(self._epoch_size())
        if per_epoch == 0:
            raise ValueError(f'the dataset has {n} samples, fewer than min_batch_size={self.min_batch_size} '
                             f'(or batch_size={self.batch_size} with drop_last=True): no batch can be formed')
        if (not self._positioned and self._offset > 0) or self._offset >= per_epoch:
            self._next_epoch_after(per_epoch)  # a pass ended by `break`, or a position at an epoch's end
        self._positioned = False
        epoch = self._epoch
        order = self._order(epoch, n)
        plan: List[Tuple[int, Optional[List[Any]]]] = []  # (global batch size, this rank's indices)
        for start in range(self._offset, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            if not self._keeps_tail(len(chunk)):
                plan.append((len(chunk), None))
                break
            plan.append((len(chunk), self._rank_slice(chunk)))
        kept = [idx for _, idx in plan if idx is not None]
        if self.num_workers > 0 and kept:
            fetched = iter(torch.utils.data.DataLoader(
                _BatchFetch(self.dataset, kept, self.collate_fn, self.max_retries), batch_size=None,
                shuffle=False, num_workers=self.num_workers, collate_fn=_identity))
        else:
            fetched = None
        for size, indices in plan:
            if indices is None:
                self._drop(size, epoch)
                continue
            if fetched is not None:
                batch = next(fetched)
            else:
                batch = [fetch(self.dataset, i, self.max_retries) for i in indices]
                batch = self.collate_fn(batch) if self.collate_fn is not None else batch
            self._advance(size)
            yield batch
        if self._epoch == epoch:
            self._epoch, self._offset = epoch + 1, 0

    def _stream(self, epoch: int) -> Iterator[Any]:
        set_epoch = getattr(self.dataset, 'set_epoch', None)
        if callable(set_epoch):
            set_epoch(epoch)
        return iter(self.dataset)

    def _emit(self, samples: List[Any]) -> Any:
        mine = self._rank_slice(samples)
        self._advance(len(samples))
        return self.collate_fn(mine) if self.collate_fn is not None else mine

    def _abandon_stream(self, live: Iterator[Any]) -> None:
        # A pass ended by `break`: read the rest of its epoch once, to count what it left unread.
        rest = sum(1 for _ in live)
        self._live = None
        self._next_epoch_after(self._samples_per_epoch(self._offset + rest))

    def _iter_stream(self) -> Iterator[Any]:
        if not self._positioned and self._live is not None:
            self._abandon_stream(self._live)
        self._positioned, self._live = False, None
        while True:
            epoch, skip = self._epoch, self._offset
            seen, yielded, buffer = 0, False, []
            self._live = stream = self._stream(epoch)
            for sample in stream:
                seen += 1
                if seen <= skip:
                    continue
                buffer.append(sample)
                if len(buffer) == self.batch_size:
                    yielded = True
                    yield self._emit(buffer)
                    buffer = []
            if buffer:
                if self._keeps_tail(len(buffer)):
                    yielded = True
                    yield self._emit(buffer)
                else:
                    self._drop(len(buffer), epoch)
            self._live = None
            if seen == 0:
                raise ValueError(f'the streaming dataset yielded no samples in epoch {epoch}')
            self._epoch = epoch + 1
            if yielded or skip == 0:
                self._offset = 0
                return
            # This epoch had been consumed before a resume: carry what is left to skip into the next one.
            self._offset = max(0, skip - self._samples_per_epoch(seen))

    def __repr__(self) -> str:
        return (f'DataLoader(batch_size={self.batch_size}, min_batch_size={self.min_batch_size}, '
                f'shuffle={self.shuffle}, dp_rank={self.dp_rank}/{self.dp_world_size}, epoch={self._epoch}, '
                f'consumed_train_samples={self._consumed})')
