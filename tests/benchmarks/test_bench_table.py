"""benchmarks/_table.py: the benchmark tables print as the scripts' own f-strings did, header and rows."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location('bench_table',
                                               Path(__file__).resolve().parents[2] / 'benchmarks' / '_table.py')
bench_table = importlib.util.module_from_spec(_SPEC)
sys.modules['bench_table'] = bench_table  # dataclasses look their module up there
_SPEC.loader.exec_module(bench_table)
Column, Table = bench_table.Column, bench_table.Table


def test_header_and_rows_align_like_fstrings():
    table = Table(Column('layout', 16, align='<'), Column('checkpointing', 14), Column('longest seq', 13),
                  Column('peak MiB', 10, '{:.0f}'), Column('tok/s vs base', 15, '{:.2f}'))
    assert table.header() == f'{"layout":<16}{"checkpointing":>14}{"longest seq":>13}{"peak MiB":>10}' \
                             f'{"tok/s vs base":>15}'
    assert table.row('cp_size=2', 'on', '4096+', 117.4, 0.876) == \
        f'{"cp_size=2":<16}{"on":>14}{"4096+":>13}{117.4:>10.0f}{0.876:>15.2f}'
    # A run without figures fills the leading columns only.
    assert table.row('ulysses_size=2', 'off', 'none fits') == f'{"ulysses_size=2":<16}{"off":>14}{"none fits":>13}'
    assert table.row('1 process', 'off', '8', 1.0, math.nan).endswith(f'{math.nan:>15.2f}')


def test_format_with_suffix_and_text_cells():
    table = Table(Column('layout', 22, align='<'), Column('processes', 10), Column('tokens/s', 12, '{:.0f}'),
                  Column('vs 1 process', 14, '{:.2f}x'))
    assert table.row('ddp', 2, 1234.56, 0.789) == f'{"ddp":<22}{2:>10}{1234.56:>12.0f}{0.789:>13.2f}x'
    # Text is shown as given, whatever the column's number format.
    assert table.row('ddp', 2, f'{1.23456:.3f}') == f'{"ddp":<22}{2:>10}{"1.235":>12}'


def test_more_values_than_columns_is_refused():
    with pytest.raises(ValueError, match='3 values for 2 columns'):
        Table(Column('a', 4), Column('b', 4)).row(1, 2, 3)
