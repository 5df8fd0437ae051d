"""Locally a missing optional package skips its tests; in CI (``CI`` set) it fails them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name('conftest.py')

PROBES = {
    'test_module_level.py': "import pytest\npytest.importorskip('twinkle_absent_pkg_a')\n\ndef test_a():\n    pass\n",
    'test_inside.py': "import pytest\n\ndef test_b():\n    pytest.importorskip('twinkle_absent_pkg_b')\n",
    'test_require.py': "from .conftest import require\n\ndef test_c():\n    require('twinkle_absent_pkg_c')\n",
    'test_own_reason.py': "import pytest\n\ndef test_d():\n    pytest.skip('not this platform')\n",
    'test_present.py': "from .conftest import require\n\ndef test_e():\n    assert require('json').dumps(1) == '1'\n",
}


def _run(folder: Path, ci: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != 'CI'}
    if ci is not None:
        env['CI'] = ci
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-rA', '-p', 'no:cacheprovider',
                           '--import-mode=importlib', '--continue-on-collection-errors', '--rootdir', str(folder),
                           str(folder)], capture_output=True, text=True, timeout=120, env=env, cwd=folder)
    return proc.stdout + proc.stderr


@pytest.fixture
def probes(tmp_path) -> Path:
    folder = tmp_path / 'probes'
    folder.mkdir()
    shutil.copy(CONFTEST, folder / 'conftest.py')
    (folder / '__init__.py').write_text('')
    for name, text in PROBES.items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.slow
def test_missing_optional_packages_skip_locally_and_fail_in_ci(probes):
    local = _run(probes, None)
    assert '1 passed, 4 skipped' in local, local
    ci = _run(probes, 'true')
    assert 'ERROR' in ci and 'test_module_level.py' in ci, ci
    assert 'FAILED' in ci and 'test_inside.py::test_b' in ci and 'test_require.py::test_c' in ci, ci
    assert 'required in CI' in ci and 'optional packages must be installed in CI' in ci, ci
    assert '2 failed, 1 passed, 1 skipped, 1 error' in ci, ci  # a skip with its own reason stays a skip
    assert '1 passed, 4 skipped' in _run(probes, 'false')
