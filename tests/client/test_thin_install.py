"""The ``twinkle-client`` distribution (clients/python) installs with pip into a fresh venv, without torch,
and drives a live server."""
from __future__ import annotations

import ast
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

from .conftest import KEY, MODEL

ROOT = Path(__file__).resolve().parents[2]
CLIENT_DIST = ROOT / 'clients' / 'python'
VENV_CACHE = Path(os.environ.get('TWINKLE_TEST_VENVS', Path.home() / '.cache' / 'twinkle-test-venvs'))


def _shipped_modules() -> set:
    """The modules setup.py puts in the wheel (read from its CLIENT_MODULES table, without running it)."""
    tree = ast.parse((CLIENT_DIST / 'setup.py').read_text())
    table = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and getattr(node.targets[0], 'id', '') == 'CLIENT_MODULES')
    return {pkg if mod == '__init__' else f'{pkg}.{mod}' for pkg, mods in table.items() for mod in mods}


def test_client_imports_no_torch_and_only_shipped_modules():
    code = ('import sys, twinkle.client; assert "torch" not in sys.modules, "torch was imported"; '
            'print(sorted(m for m in sys.modules if m == "twinkle" or m.startswith("twinkle.")))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, 'PYTHONPATH': str(ROOT / 'src')})
    assert out.returncode == 0, out.stderr[-2000:]
    imported = set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    missing = imported - _shipped_modules()
    assert not missing, f'twinkle.client imports {sorted(missing)}, which clients/python/setup.py does not ship'


def _client_venv() -> Path:
    """A venv with the client installed, cached by the hash of the distribution's build files and sources."""
    digest = hashlib.sha256()
    sources = [CLIENT_DIST / 'pyproject.toml', CLIENT_DIST / 'setup.py']
    sources += [ROOT / 'src' / (name.replace('.', '/') + ('/__init__.py' if (ROOT / 'src' / name.replace('.', '/'))
                                                          .is_dir() else '.py')) for name in sorted(_shipped_modules())]
    for path in sources:
        digest.update(path.read_bytes())
    env_dir = VENV_CACHE / f'client-{digest.hexdigest()[:16]}'
    python = env_dir / 'bin' / 'python'
    if (env_dir / 'installed').is_file():
        return python
    if VENV_CACHE.is_dir():  # venvs of earlier sources are stale
        for old in VENV_CACHE.glob('client-*'):
            shutil.rmtree(old, ignore_errors=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    out = subprocess.run([str(python), '-m', 'pip', 'install', '--disable-pip-version-check', str(CLIENT_DIST)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (env_dir / 'installed').write_text('ok\n')
    return python


SCRIPT = textwrap.dedent(f"""
    import sys
    import twinkle
    from twinkle.client import LoraConfig, TransformersModel
    assert 'torch' not in sys.modules
    twinkle.init_twinkle_client(sys.argv[1], sys.argv[2])
    model = TransformersModel(model_id={MODEL!r})
    model.add_adapter_to_model('default', LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj']))
    model.set_optimizer('AdamW', lr=1e-2)
    batch = [{{'input_ids': list(range(10, 30)), 'labels': list(range(10, 30))}}] * 2
    losses = []
    for _ in range(3):
        losses.append(model.forward_backward(inputs=batch)['loss'])
        model.clip_grad_and_step()
    assert losses[2] < losses[0], losses
    out = model.generate([list(range(10, 20)), list(range(5, 12))], max_new_tokens=6, do_sample=True)
    assert len(out) == 2 and all(1 <= len(o['token_ids']) <= 6 for o in out), out
    print('ok', losses, [o['token_ids'] for o in out])
""")


@pytest.mark.slow
def test_pip_installed_client_without_torch_drives_server(server):
    python = _client_venv()
    clean_env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    listed = subprocess.run([str(python), '-m', 'pip', 'list', '--format=freeze'], capture_output=True, text=True,
                            timeout=120, env=clean_env)
    names = {line.split('==')[0].lower() for line in listed.stdout.splitlines()}
    assert 'twinkle-client' in names, listed.stdout
    assert not names & {'torch', 'transformers', 'peft', 'numpy', 'twinkle'}, sorted(names)
    # Outside the repository, so nothing of the checkout can be imported by accident.
    out = subprocess.run([str(python), '-c', SCRIPT, server.url, KEY], capture_output=True, text=True, timeout=600,
                         cwd=str(VENV_CACHE), env=clean_env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.startswith('ok'), out.stdout
