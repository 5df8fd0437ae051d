"""Which adapter each row (or token) of a batch uses, and the grouped layout derived from it.

A :class:`Routing` names, per row, the adapter that row trains (``None`` for the base model alone), or, for
packed rows holding several sequences, per token. Every LoRA layer of one forward shares the same routing, so
the grouped layout (:class:`RoutingPlan`: token order sorted by adapter, the padded segment each token lands in)
is computed once per forward and token shape and reused by all layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

BASE = '__base__'


@dataclass(frozen=True)
class RoutingPlan:
    """The tokens of a flattened ``(N, features)`` input grouped by adapter.

    ``names[g]`` is the adapter of group ``g``; ``src`` lists the tokens that use an adapter, grouped by adapter
    (group ``g`` first, in token order); ``dest`` is where each of those tokens sits in the padded
    ``(groups * seg_len, features)`` layout (group ``g`` occupies rows ``g*seg_len .. g*seg_len+counts[g]``).
    ``padded`` is false when every token is routed and all groups have the same size: the grouped layout is then
    a permutation of the input (no zero rows), and ``dense`` is true when that permutation is the identity (rows
    already grouped), so the layout is a view and no copy is made at all. Groups are ordered by rank, and
    ``rank_slices`` lists ``(rank, first_group, end_group)`` for each run of equal rank.
    """
    names: Tuple[str, ...]
    counts: Tuple[int, ...]
    seg_len: int
    rank_slices: Tuple[Tuple[int, int, int], ...]
    src: torch.Tensor
    dest: torch.Tensor
    dense: bool
    padded: bool

    @property
    def num_groups(self) -> int:
        return len(self.names)


class Routing:
    """Adapter assignment of one batch.

    ``Routing(['a', 'b', None])`` routes row 0 to adapter ``a``, row 1 to ``b`` and row 2 to the base model only.
    ``Routing.per_token(ids, names)`` takes a ``(batch, seq)`` integer tensor of indices into ``names`` (-1: base
    only), for packed rows whose segments belong to different adapters.
    """

    def __init__(self, adapter_names: Sequence[Optional[str]]):
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise TypeError('adapter_names must be a list with one adapter name (or None) per row, '
                            f'got {type(adapter_names).__name__}')
        if len(adapter_names) == 0:
            raise ValueError('adapter_names is empty: give one adapter name (or None) per row of the batch')
        names: List[str] = []
        index: Dict[str, int] = {}
        row_ids = []
        for row, name in enumerate(adapter_names):
            if name is None or name == BASE:
                row_ids.append(-1)
                continue
            if not isinstance(name, str):
                raise TypeError(f'adapter_names[{row}] must be a str or None, got {type(name).__name__}')
            if name not in index:
                index[name] = len(names)
                names.append(name)
            row_ids.append(index[name])
        self.names: Tuple[str, ...] = tuple(names)
        self._row_ids: Optional[torch.Tensor] = torch.tensor(row_ids, dtype=torch.long)
        self._token_ids: Optional[torch.Tensor] = None
        self._plans: Dict[tuple, RoutingPlan] = {}
        self.dropout_states: Dict[tuple, torch.Tensor] = {}

    @classmethod
    def per_token(cls, token_adapter_ids: torch.Tensor, names: Sequence[str]) -> 'Routing':
        """Route each token: ``token_adapter_ids[b, t]`` indexes ``names`` (-1 means the base model only)."""
        if token_adapter_ids.dim() != 2 or token_adapter_ids.dtype not in (torch.long, torch.int, torch.int32):
            raise ValueError('token_adapter_ids must be an integer tensor of shape (batch, seq), got '
                             f'{tuple(token_adapter_ids.shape)} {token_adapter_ids.dtype}')
        if token_adapter_ids.numel() and (int(token_adapter_ids.min()) < -1
                                          or int(token_adapter_ids.max()) >= len(names)):
            raise ValueError(f'token_adapter_ids must lie in [-1, {len(names) - 1}] (indices into names)')
        self = cls.__new__(cls)
        self.names = tuple(names)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f'names must be distinct, got {list(names)}')
        self._row_ids = None
        self._token_ids = token_adapter_ids.long()
        self._plans = {}
        self.dropout_states = {}
        return self

    def _ids(self) -> torch.Tensor:
        # Exactly one of the two is set: per row by __init__, per token by per_token.
        ids = self._row_ids if self._row_ids is not None else self._token_ids
        if ids is None:
            raise RuntimeError('Routing has neither row nor token adapter ids; build it with Routing(...) '
                               'or Routing.per_token(...)')
        return ids

    @property
    def num_rows(self) -> int:
        return int(self._ids().shape[0])

    def token_ids(self, batch: int, seq: int) -> torch.Tensor:
        """``(batch * seq,)`` indices into ``self.names`` for a flattened input of that shape."""
        if batch != self.num_rows:
            raise ValueError(f'the routing names {self.num_rows} rows but the input batch has {batch}: give one '
                             'adapter name per row')
        if self._row_ids is not None:
            return self._row_ids.repeat_interleave(seq)
        token_ids = self._ids()
        if tuple(token_ids.shape) != (batch, seq):
            raise ValueError(f'token_adapter_ids has shape {tuple(token_ids.shape)} but the input has '
                             f'(batch, seq) = {(batch, seq)}')
        return token_ids.reshape(-1)

    def plan(self, batch: int, seq: int, ranks: Tuple[int, ...], device: torch.device) -> RoutingPlan:
        """The grouped layout for a layer where adapter ``names[i]`` has rank ``ranks[i]`` (0: the layer lacks it,
        so its tokens get the base output only)."""
        key = (batch, seq, ranks, str(device))
        cached = self._plans.get(key)
        if cached is None:
            cached = self._plans[key] = _build_plan(self.token_ids(batch, seq), self.names, ranks, device)
        return cached


def _build_plan(ids: torch.Tensor, names: Tuple[str, ...], ranks: Tuple[int, ...],
                device: torch.device) -> RoutingPlan:
    # Adapters this layer lacks (or no token uses) drop out: their tokens get the base output only.
    keep = torch.tensor([r > 0 for r in ranks] + [False], dtype=torch.bool)   # index -1 (base) reads the last slot
    ids = torch.where(keep[ids], ids, torch.full_like(ids, -1))
    counts_all = torch.bincount(ids[ids >= 0], minlength=len(names))
    used = sorted((i for i in range(len(names)) if int(counts_all[i]) > 0), key=lambda i: ranks[i])
    rank_slices: List[List[int]] = []
    for g, i in enumerate(used):
        if rank_slices and rank_slices[-1][0] == ranks[i]:
            rank_slices[-1][2] = g + 1
        else:
            rank_slices.append([ranks[i], g, g + 1])
    remap = torch.full((len(names) + 1,), -1, dtype=torch.long)   # slot -1 maps "base" to itself
    for g, i in enumerate(used):
        remap[i] = g
    group = remap[ids]
    counts = tuple(int(counts_all[i]) for i in used)
    seg_len = max(counts, default=0)
    # A stable sort keeps each adapter's tokens in batch order: its segment (and its dropout draws) then depend
    # only on its own rows, not on which other adapters share the batch.
    order = torch.sort(torch.where(group >= 0, group, torch.full_like(group, len(used))), stable=True).indices
    routed = int((group >= 0).sum())
    src = order[:routed]
    offsets = torch.tensor((0,) + counts[:-1], dtype=torch.long).cumsum(0)
    g_sorted = group[src]
    pos = torch.arange(routed) - offsets[g_sorted]
    dest = g_sorted * seg_len + pos
    padded = not (routed == ids.numel() and len(set(counts)) <= 1)
    dense = not padded and bool((src == torch.arange(routed)).all())
    return RoutingPlan(names=tuple(names[i] for i in used), counts=counts, seg_len=seg_len,
                       rank_slices=tuple((x[0], x[1], x[2]) for x in rank_slices), src=src.to(device),
                       dest=dest.to(device), dense=dense, padded=padded)
