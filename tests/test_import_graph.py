"""Imports in src/twinkle point down: the graph of which module imports which has no cycle.

Every import counts, those inside functions and under ``TYPE_CHECKING`` included (a lazy or type-only
import that goes up is still a dependency going up). A module importing one of its own parent packages
does not count: Python has run the parent's ``__init__`` before the module anyway.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

SRC = Path(__file__).resolve().parents[1] / 'src'


def _modules(root: Path) -> Dict[str, Path]:
    modules = {}
    for path in root.rglob('*.py'):
        parts = list(path.relative_to(root.parent).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts = parts[:-1]
        modules['.'.join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    package = name.split('.') if path.name == '__init__.py' else name.split('.')[:-1]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package ``level - 1`` steps above this module's own
                base = '.'.join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            submodules = [f'{base}.{alias.name}' for alias in node.names if f'{base}.{alias.name}' in modules]
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(base)  # names defined in the module (or package) itself
    return {m for m in found if m in modules and m != name and not name.startswith(m + '.')}


def import_graph(root: Path) -> Dict[str, Set[str]]:
    modules = _modules(root)
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_checker_finds_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / 'pkg'
    (pkg / 'sub').mkdir(parents=True)
    (pkg / '__init__.py').write_text('')
    (pkg / 'sub' / '__init__.py').write_text('from . import b\n')
    (pkg / 'a.py').write_text('def f():\n    from .sub.b import g\n')
    (pkg / 'sub' / 'b.py').write_text('from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import f\n')
    (pkg / 'c.py').write_text('import pkg\nfrom pkg import a\n')
    graph = import_graph(pkg)
    assert graph['pkg.sub'] == {'pkg.sub.b'}
    assert graph['pkg.c'] == {'pkg.a'}  # its own parent package does not count
    assert cycles(graph) == [['pkg.a', 'pkg.sub.b']]


@pytest.mark.parametrize('package', ['twinkle'])
def test_no_import_cycle(package: str) -> None:
    found = cycles(import_graph(SRC / package))
    assert not found, 'import cycles (make the lower module not import the upper one): ' + '; '.join(
        ' <-> '.join(c) for c in found)
