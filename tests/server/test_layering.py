"""Imports point down: the server shares only twinkle.wire with the client, and reaches the model backend
through the engine."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import twinkle.server

SERVER = Path(twinkle.server.__file__).parent


def _imports(path: Path):
    """The absolute names of the modules ``path`` imports from (relative imports resolved)."""
    package = ['twinkle', 'server']
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parent = package[:len(package) - node.level + 1] if node.level else []
            yield '.'.join(parent + ([node.module] if node.module else []))
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_the_server_never_imports_the_client():
    offenders = [(p.name, m) for p in SERVER.glob('*.py') for m in _imports(p)
                 if m == 'twinkle.client' or m.startswith('twinkle.client.')]
    assert not offenders


def test_only_the_engine_reaches_into_the_model_backend():
    # The model package's public API (twinkle.model) is fine anywhere; its inner modules only for engine.py.
    offenders = [(p.name, m) for p in SERVER.glob('*.py') if p.name != 'engine.py' for m in _imports(p)
                 if m.startswith('twinkle.model.')]
    assert not offenders


def test_routes_do_not_reach_into_the_shared_model():
    for path in SERVER.glob('routes_*.py'):
        assert not re.search(r'engine\.model\b', path.read_text()), path.name
