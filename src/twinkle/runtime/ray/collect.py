"""Dispatch (driver inputs -> per-rank inputs) and collect (per-rank results -> one result).

Pure functions over the mesh arithmetic, so they are tested without Ray.

Which argument is sliced: the ``inputs=`` keyword when given, else the first positional argument.
Everything else goes to every rank unchanged (an ``adapter_name``, a list of stop words...).
Slices are contiguous chunks in data-parallel order, the same chunks the DataLoader gives each rank
in torchrun mode, so a global batch trains identically in both modes.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

from twinkle.mesh import DeviceMesh


def split_for_rank(size: int, world: int, rank: int) -> Tuple[int, int]:
    """[start, end) of ``rank``'s contiguous share of ``size`` items (the DataLoader's rule)."""
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _length(value: Any) -> int:
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, dict):
        lengths = {_length(v) for v in value.values()}
        if len(lengths) != 1:
            raise ValueError(f"dispatch='slice': the values of a dict input must share their first dimension, "
                             f'got lengths {sorted(lengths)} for keys {sorted(value)}')
        return lengths.pop()
    shape = getattr(value, 'shape', None)
    if shape is not None and len(shape) > 0:
        return int(shape[0])
    raise TypeError(f"dispatch='slice' needs a list, tuple, tensor/array or dict of those to split across "
                    f'data-parallel ranks; got {type(value).__name__}. Declare the method with '
                    f"dispatch='all' if every rank should receive it whole")


def _take(value: Any, start: int, end: int) -> Any:
    if isinstance(value, dict):
        return {k: _take(v, start, end) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(value[start:end])
    if isinstance(value, list):
        return value[start:end]
    return value[start:end]


def slice_inputs(args: tuple, kwargs: Dict[str, Any], mesh: DeviceMesh,
                 method: str = 'method') -> List[Tuple[tuple, Dict[str, Any]]]:
    """Per-rank ``(args, kwargs)`` for every rank of ``mesh`` (in ``mesh.global_ranks`` order)."""
    world = mesh.data_world_size
    if 'inputs' in kwargs:
        value, where = kwargs['inputs'], 'inputs='
    elif args:
        value, where = args[0], 'the first positional argument'
    else:
        raise TypeError(f"{method}: dispatch='slice' needs inputs= or a positional argument to split across the "
                        f'{world} data-parallel ranks')
    size = _length(value)
    if size < world:
        raise ValueError(f'{method}: {where} holds {size} item(s) but there are {world} data-parallel ranks, so '
                         f'some rank would get nothing; pass a batch of at least {world} (ideally a multiple)')
    out = []
    for rank in mesh.global_ranks:
        start, end = split_for_rank(size, world, mesh.data_rank_of(rank))
        part = _take(value, start, end)
        if 'inputs' in kwargs:
            out.append((args, {**kwargs, 'inputs': part}))
        else:
            out.append(((part,) + tuple(args[1:]), kwargs))
    return out


def representatives(mesh: DeviceMesh) -> List[int]:
    """Positions (into ``mesh.global_ranks``) of one rank per data slice, in slice order.

    Ranks that share a slice (tensor/context parallel peers, Ulysses peers, pipeline stages) return
    the same figures; the last pipeline stage is the one holding outputs.
    """
    ranks = mesh.global_ranks
    chosen: Dict[int, int] = {}
    for pos, rank in enumerate(ranks):
        d = mesh.data_rank_of(rank)
        if mesh.is_last_pp_stage(rank) and d not in chosen:
            chosen[d] = pos
    return [chosen[d] for d in sorted(chosen)]


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith('torch') and hasattr(x, 'dim')


def _mean(values: List[Any]) -> Any:
    first = values[0]
    if isinstance(first, dict):
        return {k: _mean([v[k] for v in values]) if all(isinstance(v, dict) and k in v for v in values) else first[k]
                for k in first}
    if all(_is_number(v) for v in values):
        return sum(values) / len(values)
    if all(_is_tensor(v) for v in values):
        import torch
        return torch.stack([v.float() for v in values]).mean(dim=0)
    return first  # strings, flags, None: the ranks agree on them, or there is no meaningful mean


def _sum(values: List[Any]) -> Any:
    first = values[0]
    if isinstance(first, dict):
        return {k: _sum([v[k] for v in values]) if all(isinstance(v, dict) and k in v for v in values) else first[k]
                for k in first}
    if all(_is_number(v) or _is_tensor(v) for v in values):
        total = values[0]
        for v in values[1:]:
            total = total + v
        return total
    raise TypeError(f"collect='sum' needs numbers, tensors or dicts of them; got {type(first).__name__}")


def _flatten(values: List[Any]) -> Any:
    first = values[0]
    if isinstance(first, dict):
        return {k: _flatten([v.get(k) for v in values]) for k in first}
    if all(isinstance(v, (list, tuple)) for v in values):
        return [item for v in values for item in v]
    if all(_is_tensor(v) and v.dim() > 0 for v in values):
        import torch
        try:
            return torch.cat(values, dim=0)
        except RuntimeError:  # ranks padded to different lengths: keep one row per sample
            return [row for v in values for row in v]
    return list(values)


COLLECTORS: Dict[str, Callable[[List[Any]], Any]] = {
    'first': lambda values: values[0], 'mean': _mean, 'sum': _sum, 'flatten': _flatten}


def collect(results: Sequence[Any], how: Union[str, Callable[[list], Any]], mesh: DeviceMesh,
            dispatch: str) -> Any:
    """Combine per-rank ``results`` (in ``mesh.global_ranks`` order) as the method declared.

    After ``dispatch='slice'`` only one rank per data slice counts (see :func:`representatives`);
    after ``dispatch='all'`` every rank does, in rank order.
    """
    results = list(results)
    if dispatch == 'slice' and len(results) == mesh.world_size:
        results = [results[i] for i in representatives(mesh)]
    if callable(how):
        return how(results)
    if how == 'first':
        return results[0]
    try:
        return COLLECTORS[how](results)
    except KeyError:
        raise ValueError(f'collect={how!r} must be one of {sorted(COLLECTORS)} or a callable') from None
