"""Fixed-width result tables for the benchmark scripts: one column list gives the header and every row,
so titles and figures cannot drift apart.

    table = Table(Column('layout', 16, align='<'), Column('tokens/s', 10, '{:.0f}'))
    print(table.header())
    print(table.row('ddp', 1234.5))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Column:
    title: str
    width: int
    fmt: str = '{}'
    """Applied to values that are not text yet; a row passes a string to show it as it is."""
    align: str = '>'

    def cell(self, value: Any) -> str:
        text = value if isinstance(value, str) else self.fmt.format(value)
        return f'{text:{self.align}{self.width}}'


class Table:

    def __init__(self, *columns: Column) -> None:
        self.columns = columns

    def header(self) -> str:
        return self.row(*(c.title for c in self.columns))

    def row(self, *values: Any) -> str:
        """One line; with fewer values than columns, only the leading columns (e.g. a run that has no figures)."""
        if len(values) > len(self.columns):
            raise ValueError(f'{len(values)} values for {len(self.columns)} columns')
        return ''.join(c.cell(v) for c, v in zip(self.columns, values))
