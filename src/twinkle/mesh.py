"""Device layout: which rank holds which slice of the model and of the data.

Everything here is plain integer arithmetic, so a mesh can be built, printed, pickled and sent to
another process without touching ``torch.distributed``. Only :meth:`DeviceMesh.to_torch` talks to
torch, and only when called.

Dimension order, outermost first: ``pp, dp, fsdp, cp, tp``. Ranks that differ only in the innermost
coordinate are adjacent (``rank`` and ``rank + 1``), and adjacent ranks usually share a node and its
fast links. So the dimension that communicates the most on every layer (tensor parallel all-reduces)
is innermost, then context parallel (ring attention exchanges key/value blocks every layer), then the
FSDP shard group (all-gather / reduce-scatter of every layer's weights), then plain data-parallel
replicas (one gradient all-reduce per step, as in HSDP: replicate across nodes, shard within), and
pipeline stages outermost (point-to-point activations only). Megatron orders its groups the same way.

Two dimensions are not axes of their own but fold over others:

* ``ep`` (expert parallel) splits the ``dp x fsdp x cp`` ranks of each pipeline stage and tensor
  slice, like Megatron's expert-data-parallel layout: with ``d`` the position in that flattened block,
  the expert-parallel coordinate is ``d % ep`` and the expert-data-parallel coordinate ``d // ep``.
  Dense layers are replicated/sharded over all ``dp x fsdp x cp`` ranks; experts only over ``edp``.
* ``ulysses`` (sequence parallel as in DeepSpeed-Ulysses) splits the data-parallel ranks
  ``dp x fsdp``: ranks of one Ulysses group share a sample and each holds part of its sequence. They
  still hold the same weights, so gradients are reduced over all ``dp x fsdp`` ranks
  (:attr:`dp_fsdp_world_size`), while the number of distinct batch slices is
  :attr:`data_world_size` = ``dp x fsdp / ulysses``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .device_group import DEVICE_TYPES, DeviceGroup  # noqa: F401  (re-exported: twinkle.mesh.DeviceGroup)
from .mesh_args import DIM_NAMES, check_size, check_unsupported, from_array

if TYPE_CHECKING:
    import numpy as np


# Groups that are not mesh axes but folds over them (see the module docstring).
FOLDED_GROUPS: Tuple[str, ...] = ('ep', 'edp', 'ulysses', 'data')

# torch DeviceMeshes already built, keyed by (mesh, device_type). Module level rather than on the
# instance so that meshes stay immutable, hashable and picklable; cleared by the runtime on teardown.
_TORCH_MESHES: Dict[Tuple['DeviceMesh', Tuple[str, ...], str], Any] = {}


class _Process:
    """What the mesh needs to know of the process it runs in: its global rank, and how to start a
    one-rank process group when none exists. ``twinkle.runtime`` owns both and binds them
    (``bind_process``) when it is imported; the mesh itself only describes layouts."""
    rank: Optional[Callable[[], int]] = None
    start_single_group: Optional[Callable[[str], None]] = None


def bind_process(rank: Callable[[], int], start_single_group: Callable[[str], None]) -> None:
    _Process.rank = rank
    _Process.start_single_group = start_single_group


def _bound(hook: Optional[Callable[..., Any]]) -> Callable[..., Any]:
    if hook is None:
        raise RuntimeError('twinkle.runtime is not imported: import twinkle before using a DeviceMesh')
    return hook


@dataclass(frozen=True, init=False)
class DeviceMesh:
    """A parallel layout over ``world_size`` ranks.

    Build it with :meth:`from_sizes`, with the sizes as keywords, or from an array of global ranks
    with one axis per named dimension: ``DeviceMesh(mesh=np.arange(8).reshape(2, 4),
    mesh_dim_names=('dp', 'fsdp'))``. The named axes may come in any order; they are stored in the
    canonical order :data:`DIM_NAMES` and :attr:`mesh` gives the array back in the given order.

    ``ranks`` maps mesh positions (row-major over :data:`DIM_NAMES`) to global ranks; ``None`` means
    ``0 .. world_size - 1``. Sub-meshes (:meth:`sub_mesh`) carry the global ranks they cover.
    """

    pp_size: int = 1
    dp_size: int = 1
    fsdp_size: int = 1
    cp_size: int = 1
    tp_size: int = 1
    ep_size: int = 1
    ulysses_size: int = 1
    sequence_parallel: bool = False
    ranks: Optional[Tuple[int, ...]] = field(default=None)
    # Presentation only, so equal layouts stay equal: the device the mesh is meant for and the axis
    # order :attr:`mesh` and :attr:`mesh_dim_names` report.
    device_type: str = field(default='auto', compare=False)
    dim_order: Optional[Tuple[str, ...]] = field(default=None, compare=False)

    def __init__(self, mesh: Any = None, mesh_dim_names: Optional[Sequence[str]] = None, *, pp_size: int = 1,
                 dp_size: int = 1, fsdp_size: int = 1, cp_size: int = 1, tp_size: int = 1, ep_size: Optional[int] = 1,
                 ulysses_size: Optional[int] = 1, sequence_parallel: bool = False,
                 ranks: Optional[Sequence[int]] = None, device_type: str = 'auto',
                 dim_order: Optional[Sequence[str]] = None, etp_size: Optional[int] = None,
                 vpp_size: Optional[int] = None) -> None:
        sizes = dict(pp_size=pp_size, dp_size=dp_size, fsdp_size=fsdp_size, cp_size=cp_size, tp_size=tp_size)
        if mesh is not None or mesh_dim_names is not None:
            if ranks is not None or dim_order is not None or any(v != 1 for v in sizes.values()):
                raise ValueError('DeviceMesh: pass either mesh=/mesh_dim_names= or the *_size keywords '
                                 '(and ranks=), not both')
            sizes, ranks, dim_order = from_array(mesh, mesh_dim_names)
        if device_type not in DEVICE_TYPES + ('npu', 'mps'):
            raise ValueError(f'DeviceMesh: device_type={device_type!r} must be one of {DEVICE_TYPES + ("npu", "mps")}')
        check_unsupported(etp_size, vpp_size, sizes['tp_size'])
        for name, value in sizes.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, 'ep_size', 1 if ep_size is None else ep_size)
        object.__setattr__(self, 'ulysses_size', 1 if ulysses_size is None else ulysses_size)
        object.__setattr__(self, 'sequence_parallel', bool(sequence_parallel))
        object.__setattr__(self, 'ranks', None if ranks is None else tuple(ranks))
        object.__setattr__(self, 'device_type', device_type)
        object.__setattr__(self, 'dim_order', None if dim_order is None else tuple(dim_order))
        self.__post_init__()

    def __post_init__(self) -> None:
        for name in ('pp_size', 'dp_size', 'fsdp_size', 'cp_size', 'tp_size', 'ep_size', 'ulysses_size'):
            check_size(name, getattr(self, name))
        expert_block = self.dp_size * self.fsdp_size * self.cp_size
        if expert_block % self.ep_size:
            raise ValueError(
                f'DeviceMesh: ep_size={self.ep_size} must divide dp_size*fsdp_size*cp_size={expert_block} '
                f'(dp_size={self.dp_size}, fsdp_size={self.fsdp_size}, cp_size={self.cp_size}): experts '
                f'are split over the data-parallel and context-parallel ranks of each stage')
        if self.dp_fsdp_world_size % self.ulysses_size:
            raise ValueError(
                f'DeviceMesh: ulysses_size={self.ulysses_size} must divide dp_size*fsdp_size='
                f'{self.dp_fsdp_world_size} (dp_size={self.dp_size}, fsdp_size={self.fsdp_size}): Ulysses '
                f'groups are carved out of the data-parallel ranks')
        if self.ranks is not None:
            ranks = tuple(self.ranks)
            object.__setattr__(self, 'ranks', ranks)
            n = math.prod(self.mesh_shape)
            if len(ranks) != n:
                raise ValueError(f'DeviceMesh: ranks has {len(ranks)} entries but the sizes cover {n} ranks')
            if len(set(ranks)) != n or any(isinstance(r, bool) or not isinstance(r, int) or r < 0
                                           for r in ranks):
                raise ValueError(f'DeviceMesh: ranks={list(ranks)} must be distinct non-negative integers')
        if self.dim_order is not None:
            order = self.dim_order
            missing = [n for n, size in zip(DIM_NAMES, self.mesh_shape) if size > 1 and n not in order]
            if len(set(order)) != len(order) or any(n not in DIM_NAMES for n in order) or missing:
                raise ValueError(f'DeviceMesh: dim_order={order} must name distinct dimensions of {DIM_NAMES}, '
                                 f'including every one larger than 1')

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_sizes(cls, dp_size: Optional[int] = None, fsdp_size: int = 1, tp_size: int = 1,
                   pp_size: int = 1, cp_size: int = 1, ep_size: int = 1, ulysses_size: int = 1,
                   world_size: Optional[int] = None, sequence_parallel: bool = False,
                   device_type: str = 'auto', etp_size: Optional[int] = None,
                   vpp_size: Optional[int] = None) -> 'DeviceMesh':
        """``dp_size=None`` fills the ranks the other sizes leave (without ``world_size``: the fewest that
        hold whole Ulysses groups, e.g. 2 for ``ulysses_size=2`` alone). ``None`` sizes count as 1."""
        fsdp_size, tp_size, pp_size, cp_size, ep_size, ulysses_size = (
            1 if v is None else v for v in (fsdp_size, tp_size, pp_size, cp_size, ep_size, ulysses_size))
        for name, value in (('fsdp_size', fsdp_size), ('tp_size', tp_size), ('pp_size', pp_size),
                            ('cp_size', cp_size), ('ep_size', ep_size), ('ulysses_size', ulysses_size)):
            check_size(name, value)
        others = fsdp_size * tp_size * pp_size * cp_size
        detail = f'(fsdp_size={fsdp_size}, tp_size={tp_size}, pp_size={pp_size}, cp_size={cp_size})'
        if world_size is not None:
            check_size('world_size', world_size)
        if dp_size is None:
            if world_size is None:
                dp_size = ulysses_size // math.gcd(ulysses_size, fsdp_size)
            elif world_size % others:
                raise ValueError(f'DeviceMesh: world_size={world_size} is not divisible by '
                                 f'fsdp_size*tp_size*pp_size*cp_size={others} {detail}')
            else:
                dp_size = world_size // others
        check_size('dp_size', dp_size)
        if world_size is not None and dp_size * others != world_size:
            raise ValueError(f'DeviceMesh: dp_size={dp_size} times fsdp_size*tp_size*pp_size*cp_size={others} '
                             f'{detail} is {dp_size * others}, not world_size={world_size}')
        return cls(pp_size=pp_size, dp_size=dp_size, fsdp_size=fsdp_size, cp_size=cp_size, tp_size=tp_size,
                   ep_size=ep_size, ulysses_size=ulysses_size, sequence_parallel=bool(sequence_parallel),
                   device_type=device_type, etp_size=etp_size, vpp_size=vpp_size)

    # ---------------------------------------------------------------- shape
    @property
    def mesh_shape(self) -> Tuple[int, ...]:
        return (self.pp_size, self.dp_size, self.fsdp_size, self.cp_size, self.tp_size)

    @property
    def dim_names(self) -> Tuple[str, ...]:
        return DIM_NAMES

    def size(self, dim: str) -> int:
        if dim not in DIM_NAMES:
            raise ValueError(f'DeviceMesh: unknown dimension {dim!r}; expected one of {DIM_NAMES}')
        return getattr(self, f'{dim}_size')

    @property
    def world_size(self) -> int:
        return math.prod(self.mesh_shape)

    @property
    def global_ranks(self) -> List[int]:
        return list(self.ranks) if self.ranks is not None else list(range(self.world_size))

    @property
    def mesh_dim_names(self) -> Tuple[str, ...]:
        """The axes of :attr:`mesh`: as given to the constructor, else the dimensions larger than 1."""
        if self.dim_order is not None:
            return self.dim_order
        return tuple(n for n, s in zip(DIM_NAMES, self.mesh_shape) if s > 1) or ('dp',)

    @property
    def mesh(self) -> 'np.ndarray':
        """Global ranks as an integer array with one axis per :attr:`mesh_dim_names` entry."""
        import numpy as np
        full = np.asarray(self.global_ranks, dtype=np.int64).reshape(self.mesh_shape)
        names = self.mesh_dim_names
        # Drop the unnamed (size-1) axes, then order the rest as named.
        full = full.reshape([s for n, s in zip(DIM_NAMES, self.mesh_shape) if n in names])
        kept = [n for n in DIM_NAMES if n in names]
        return full.transpose([kept.index(n) for n in names])

    @property
    def dp_world_size(self) -> int:
        """The size of the ``dp`` (replicated data-parallel) dimension alone; see :attr:`data_world_size`."""
        return self.dp_size

    @property
    def dp_fsdp_world_size(self) -> int:
        """Ranks that hold the same weights and average their gradients: ``dp x fsdp``."""
        return self.dp_size * self.fsdp_size

    @property
    def data_world_size(self) -> int:
        """Distinct slices of a global batch: ``dp x fsdp / ulysses``."""
        return self.dp_fsdp_world_size // self.ulysses_size

    # ---------------------------------------------------------------- this process's position
    def _own_coords(self) -> Optional[Dict[str, int]]:
        own = _bound(_Process.rank)()
        if own not in self.global_ranks:
            return None
        return self.coords_of(own)

    def _own(self, dim: str) -> Optional[int]:
        """This process's coordinate along ``dim``; ``None`` when this process is not in the mesh."""
        c = self._own_coords()
        return None if c is None else c[dim]

    @property
    def ep_rank(self) -> Optional[int]:
        c = self._own_coords()
        return None if c is None else self._expert_pos(c) % self.ep_size

    @property
    def ulysses_rank(self) -> Optional[int]:
        c = self._own_coords()
        return None if c is None else (c['dp'] * self.fsdp_size + c['fsdp']) % self.ulysses_size

    @property
    def data_rank(self) -> Optional[int]:
        """Which slice of the global batch this process consumes (see :meth:`data_rank_of`)."""
        c = self._own_coords()
        return None if c is None else (c['dp'] * self.fsdp_size + c['fsdp']) // self.ulysses_size

    # ---------------------------------------------------------------- rank <-> coordinates
    def _index(self, rank: int) -> int:
        if self.ranks is None:
            if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
                raise ValueError(f'{self!r}: rank={rank!r} is outside 0..{self.world_size - 1}')
            return rank
        try:
            return self.ranks.index(rank)
        except ValueError:
            raise ValueError(f'{self!r}: rank={rank!r} is not one of its ranks {list(self.ranks)}') from None

    def _rank_at(self, index: int) -> int:
        return index if self.ranks is None else self.ranks[index]

    def coords_of(self, rank: int) -> Dict[str, int]:
        """``{'pp': .., 'dp': .., 'fsdp': .., 'cp': .., 'tp': ..}`` of a global rank."""
        index = self._index(rank)
        coords = {}
        for name, size in zip(reversed(DIM_NAMES), reversed(self.mesh_shape)):
            index, coords[name] = divmod(index, size)
        return {name: coords[name] for name in DIM_NAMES}

    def rank_of(self, **coords: int) -> int:
        """The global rank at the given coordinates; dimensions left out are 0."""
        unknown = sorted(set(coords) - set(DIM_NAMES))
        if unknown:
            raise TypeError(f'DeviceMesh.rank_of: unknown dimension(s) {unknown}; expected {DIM_NAMES}')
        index = 0
        for name, size in zip(DIM_NAMES, self.mesh_shape):
            c = coords.get(name, 0)
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < size:
                raise ValueError(f'DeviceMesh.rank_of: {name}={c!r} is outside 0..{size - 1} in {self!r}')
            index = index * size + c
        return self._rank_at(index)

    def dp_rank_of(self, rank: int) -> int:
        """The ``dp`` coordinate of ``rank`` (0 .. dp_world_size - 1)."""
        return self.coords_of(rank)['dp']

    def dp_fsdp_rank_of(self, rank: int) -> int:
        """Position among the ``dp x fsdp`` ranks holding the same weights (0 .. dp_fsdp_world_size - 1)."""
        c = self.coords_of(rank)
        return c['dp'] * self.fsdp_size + c['fsdp']

    def data_rank_of(self, rank: int) -> int:
        """Which slice of the global batch this rank consumes (0 .. data_world_size - 1)."""
        return self.dp_fsdp_rank_of(rank) // self.ulysses_size

    def ep_rank_of(self, rank: int) -> int:
        return self._expert_pos(self.coords_of(rank)) % self.ep_size

    def ulysses_rank_of(self, rank: int) -> int:
        return self.dp_fsdp_rank_of(rank) % self.ulysses_size

    def is_first_pp_stage(self, rank: int) -> bool:
        return self.coords_of(rank)['pp'] == 0

    def is_last_pp_stage(self, rank: int) -> bool:
        return self.coords_of(rank)['pp'] == self.pp_size - 1

    def _expert_pos(self, c: Dict[str, int]) -> int:
        return (c['dp'] * self.fsdp_size + c['fsdp']) * self.cp_size + c['cp']

    # ---------------------------------------------------------------- groups
    def _group_key(self, dims: Tuple[str, ...], c: Dict[str, int]) -> Tuple[int, ...]:
        """Ranks with equal keys form one group."""
        if dims == ('ep',):
            return c['pp'], c['tp'], self._expert_pos(c) // self.ep_size
        if dims == ('edp',):
            return c['pp'], c['tp'], self._expert_pos(c) % self.ep_size
        if dims == ('ulysses',):
            return c['pp'], c['cp'], c['tp'], (c['dp'] * self.fsdp_size + c['fsdp']) // self.ulysses_size
        if dims == ('data',):  # ranks that receive the same batch slice
            return (c['dp'] * self.fsdp_size + c['fsdp']) // self.ulysses_size,
        return tuple(c[name] for name in DIM_NAMES if name not in dims)

    def _normalize_dims(self, dim_or_dims: Union[str, Sequence[str]]) -> Tuple[str, ...]:
        dims = (dim_or_dims,) if isinstance(dim_or_dims, str) else tuple(dim_or_dims)
        if not dims:
            raise ValueError('DeviceMesh: at least one dimension is needed')
        folded = [d for d in dims if d in FOLDED_GROUPS]
        if folded and len(dims) > 1:
            raise ValueError(f'DeviceMesh: {folded[0]!r} is a folded group and must be requested alone, got {dims}')
        unknown = [d for d in dims if d not in DIM_NAMES and d not in FOLDED_GROUPS]
        if unknown:
            raise ValueError(f'DeviceMesh: unknown dimension(s) {unknown}; expected {DIM_NAMES} or {FOLDED_GROUPS}')
        return dims

    def group_ranks(self, dim_or_dims: Union[str, Sequence[str]], rank: int) -> List[int]:
        """Global ranks that share every coordinate of ``rank`` except ``dim_or_dims``, in mesh order.

        Besides the axes, accepts the folded groups ``'ep'``, ``'edp'`` (expert data parallel),
        ``'ulysses'`` and ``'data'`` (ranks fed the same batch slice).
        """
        dims = self._normalize_dims(dim_or_dims)
        key = self._group_key(dims, self.coords_of(rank))
        out = []
        for index in range(self.world_size):
            r = self._rank_at(index)
            if self._group_key(dims, self.coords_of(r)) == key:
                out.append(r)
        return out

    def all_groups(self, dim_or_dims: Union[str, Sequence[str]]) -> List[List[int]]:
        """Every group along ``dim_or_dims``, each once (what ``new_group`` calls need on all ranks)."""
        dims = self._normalize_dims(dim_or_dims)
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for index in range(self.world_size):
            r = self._rank_at(index)
            groups.setdefault(self._group_key(dims, self.coords_of(r)), []).append(r)
        return list(groups.values())

    def sub_mesh(self, dims: Union[str, Iterable[str]], rank: int) -> 'DeviceMesh':
        """The mesh over the ranks sharing ``rank``'s coordinates outside ``dims``.

        E.g. ``mesh.sub_mesh(('dp', 'fsdp', 'cp', 'tp'), rank)`` is ``rank``'s pipeline stage. ``ep`` and
        ``ulysses`` survive only when the dimensions they fold over are all kept.
        """
        dims = self._normalize_dims(dims if isinstance(dims, str) else tuple(dims))
        if any(d in FOLDED_GROUPS for d in dims):
            raise ValueError(f'DeviceMesh.sub_mesh: only the axes {DIM_NAMES} can be kept, got {dims}')
        sizes: Dict[str, Any] = {f'{d}_size': (self.size(d) if d in dims else 1) for d in DIM_NAMES}
        keep_ep = all(d in dims for d in ('dp', 'fsdp', 'cp'))
        keep_ulysses = all(d in dims for d in ('dp', 'fsdp'))
        return DeviceMesh(**sizes, ep_size=self.ep_size if keep_ep else 1,
                          ulysses_size=self.ulysses_size if keep_ulysses else 1,
                          sequence_parallel=self.sequence_parallel and 'tp' in dims,
                          ranks=tuple(self.group_ranks(dims, rank)), device_type=self.device_type)

    # ---------------------------------------------------------------- torch
    def to_torch(self, device_type: str = 'cpu') -> Any:
        """The ``torch.distributed.device_mesh.DeviceMesh`` over :attr:`mesh_dim_names`, in that order (the
        axes a rank array was given with, else the dimensions larger than 1 in the canonical order).

        Built on first call and cached. Collective: every rank of the process group must call it.
        With every size 1 the torch mesh has one dimension ``'dp'`` of size 1. In a single process
        with no process group, a one-rank group is created first (FSDP2 and DTensor need one).
        """
        key = (self, self.mesh_dim_names, device_type)  # equal layouts may differ in axis order
        cached = _TORCH_MESHES.get(key)
        if cached is not None:
            return cached
        import torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import DeviceMesh as TorchMesh, init_device_mesh

        if not dist.is_initialized():
            if self.world_size != 1 or self.global_ranks != [0]:
                raise RuntimeError(f'{self!r}.to_torch needs torch.distributed to be initialised; '
                                   f'call twinkle.initialize(mode="local", ...) under torchrun first')
            _bound(_Process.start_single_group)(device_type)
        world = dist.get_world_size()
        if max(self.global_ranks) >= world:
            raise ValueError(f'{self!r} names rank {max(self.global_ranks)} but the process group has '
                             f'{world} ranks')
        names = self.mesh_dim_names
        if self.dim_order is None and self.ranks is None and self.world_size == world:
            shape = tuple(s for s in self.mesh_shape if s > 1) or (1,)
            mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
        else:
            mesh = TorchMesh(device_type, torch.as_tensor(self.mesh.reshape(-1)).reshape(self.mesh.shape),
                             mesh_dim_names=names)
        _TORCH_MESHES[key] = mesh
        return mesh

    # ---------------------------------------------------------------- serialisation / display
    def to_dict(self) -> Dict[str, Any]:
        return {'pp_size': self.pp_size, 'dp_size': self.dp_size, 'fsdp_size': self.fsdp_size,
                'cp_size': self.cp_size, 'tp_size': self.tp_size, 'ep_size': self.ep_size,
                'ulysses_size': self.ulysses_size, 'sequence_parallel': self.sequence_parallel,
                'ranks': list(self.ranks) if self.ranks is not None else None,
                **({'device_type': self.device_type} if self.device_type != 'auto' else {}),
                **({'dim_order': list(self.dim_order)} if self.dim_order is not None else {})}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> 'DeviceMesh':
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f'DeviceMesh.from_dict: unknown key(s) {unknown}')
        data = dict(data)
        for key in ('ranks', 'dim_order'):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    def __repr__(self) -> str:
        parts = [f'pp={self.pp_size}'] if self.pp_size > 1 else []
        parts += [f'dp={self.dp_size}', f'fsdp={self.fsdp_size}']
        parts += [f'cp={self.cp_size}'] if self.cp_size > 1 else []
        parts += [f'tp={self.tp_size}']
        parts += [f'ep={self.ep_size}'] if self.ep_size > 1 else []
        parts += [f'ulysses={self.ulysses_size}'] if self.ulysses_size > 1 else []
        parts += ['sequence_parallel'] if self.sequence_parallel else []
        tail = f'world={self.world_size}'
        if self.ranks is not None and self.global_ranks != list(range(self.world_size)):
            tail += f', ranks={list(self.ranks)}'
        return f'DeviceMesh({", ".join(parts)} | {tail})'


def _size_property(dim: str) -> property:
    return property(lambda self: getattr(self, f'{dim}_size'), doc=f'The size of the ``{dim}`` dimension alone.')


def _rank_property(dim: str) -> property:
    return property(lambda self: self._own(dim),
                    doc=f"This process's ``{dim}`` coordinate; None when it is not in the mesh.")


# The seed API's per-dimension spellings (``tp_world_size``, ``tp_rank``, ...), one per axis; dp's size is
# written out above for its docstring, and ep / ulysses / data ranks fold several axes.
for _dim in ('fsdp', 'tp', 'pp', 'cp', 'ep', 'ulysses'):
    setattr(DeviceMesh, f'{_dim}_world_size', _size_property(_dim))
for _dim in DIM_NAMES:
    setattr(DeviceMesh, f'{_dim}_rank', _rank_property(_dim))
del _dim
