"""DeviceGroup: a named set of ranks that components are placed on (no torch import)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple, Union

DEVICE_TYPES: Tuple[str, ...] = ('auto', 'cpu', 'cuda')


@dataclass
class DeviceGroup:
    """A named set of ranks (processes/devices) that components are placed on.

    ``ranks`` is a count or an explicit list of device indices. ``device_type='auto'`` means CUDA
    when it is available, else CPU.
    """

    name: str
    ranks: Union[int, List[int]]
    device_type: str = 'auto'

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f'DeviceGroup: name={self.name!r} must be a non-empty string')
        if isinstance(self.ranks, bool) or not isinstance(self.ranks, (int, list, tuple, range)):
            raise ValueError(f'DeviceGroup {self.name!r}: ranks={self.ranks!r} must be a count or a list of ints')
        if isinstance(self.ranks, int):
            if self.ranks < 1:
                raise ValueError(f'DeviceGroup {self.name!r}: ranks={self.ranks} must be at least 1')
        else:
            ranks = list(self.ranks)
            if not ranks or len(set(ranks)) != len(ranks) or any(
                    isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in ranks):
                raise ValueError(f'DeviceGroup {self.name!r}: ranks={ranks} must be distinct non-negative ints')
            self.ranks = ranks
        if self.device_type not in DEVICE_TYPES:
            raise ValueError(f'DeviceGroup {self.name!r}: device_type={self.device_type!r} must be one of '
                             f'{DEVICE_TYPES}')

    @property
    def num_ranks(self) -> int:
        return self.ranks if isinstance(self.ranks, int) else len(self.ranks)
