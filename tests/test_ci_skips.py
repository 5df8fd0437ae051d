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


def _start(folder: Path, ci: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != 'CI'}
    if ci is not None:
        env['CI'] = ci
    return subprocess.Popen([sys.executable, '-m', 'pytest', '-q', '-rA', '-p', 'no:cacheprovider',
                             '--import-mode=importlib', '--continue-on-collection-errors', '--rootdir', str(folder),
                             str(folder)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=folder)


def _outputs(procs: list) -> list:
    try:
        return [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()


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
    # Three independent pytest runs of the same probes, started together (each is mostly start-up).
    local, ci, ci_false = _outputs([_start(probes, c) for c in (None, 'true', 'false')])
    assert '1 passed, 4 skipped' in local, local
    assert 'ERROR' in ci and 'test_module_level.py' in ci, ci
    assert 'FAILED' in ci and 'test_inside.py::test_b' in ci and 'test_require.py::test_c' in ci, ci
    assert 'required in CI' in ci and 'optional packages must be installed in CI' in ci, ci
    assert '2 failed, 1 passed, 1 skipped, 1 error' in ci, ci  # a skip with its own reason stays a skip
    assert '1 passed, 4 skipped' in ci_false, ci_false
