"""Checking the arguments a DeviceMesh is built from: sizes, a named rank array, unsupported layouts."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

# Mesh axes, outermost first (the reasons for this order are in twinkle.mesh).
DIM_NAMES: Tuple[str, ...] = ('pp', 'dp', 'fsdp', 'cp', 'tp')


def check_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'DeviceMesh: {name}={value!r} must be a positive integer')
    return value


def from_array(mesh: Any, names: Optional[Sequence[str]]) -> Tuple[Dict[str, int], Optional[Tuple[int, ...]],
                                                                      Tuple[str, ...]]:
    """Sizes, canonical-order ranks and the given axis order of a named rank array."""
    import numpy as np

    if mesh is None or names is None:
        raise ValueError('DeviceMesh: mesh= and mesh_dim_names= go together, e.g. '
                         "DeviceMesh(mesh=np.arange(4).reshape(2, 2), mesh_dim_names=('dp', 'tp'))")
    names = (names,) if isinstance(names, str) else tuple(names)
    array = np.asarray(mesh)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f'DeviceMesh: mesh must hold integer ranks, got dtype {array.dtype}')
    if array.ndim != len(names):
        raise ValueError(f'DeviceMesh: mesh has {array.ndim} axes but mesh_dim_names={names} names {len(names)}')
    unknown = [n for n in names if n not in DIM_NAMES]
    if unknown:
        raise ValueError(f'DeviceMesh: mesh_dim_names {unknown} are not axes; use one of {DIM_NAMES} '
                         f'(expert parallel and Ulysses fold over them: pass ep_size= / ulysses_size=)')
    if len(set(names)) != len(names):
        raise ValueError(f'DeviceMesh: mesh_dim_names={names} repeats a dimension')
    sizes = {f'{n}_size': 1 for n in DIM_NAMES}
    sizes.update({f'{n}_size': int(s) for n, s in zip(names, array.shape)})
    # Transpose into the canonical order, adding size-1 axes for the dimensions not named.
    canonical = array.transpose([names.index(n) for n in DIM_NAMES if n in names])
    flat = [int(r) for r in canonical.reshape(-1)]
    ranks = None if flat == list(range(len(flat))) else tuple(flat)
    return sizes, ranks, names


def check_unsupported(etp_size: Optional[int], vpp_size: Optional[int], tp_size: int) -> None:
    # Accepted for scripts that pass them, as long as they ask for the only layout supported.
    if etp_size not in (None, tp_size):
        raise ValueError(f'DeviceMesh: etp_size={etp_size} must equal tp_size={tp_size} (or be None): experts are '
                         f'split over the same tensor-parallel ranks as the dense layers')
    if vpp_size not in (None, 1):
        raise ValueError(f'DeviceMesh: vpp_size={vpp_size} (virtual pipeline stages) is not supported; use '
                         f'pp_size alone')
