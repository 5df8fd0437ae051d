"""tinker-cookbook's own recipes, unchanged, against ``twinkle serve``: ``cookbook/client/tinker_cookbook_recipes.py``
runs ``sl_loop`` and then ``rl_loop`` warm-started from it, in a Python 3.12 venv (built once, cached outside the
clone) with a local Hugging Face cache standing in for the hub.

The recipes need Python >= 3.12 (tinker-cookbook 0.5.8 / 0.6.1); without a ``python3.12`` these tests skip,
also in CI. ``TWINKLE_PYTHON312`` names another interpreter.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / 'cookbook' / 'client' / 'tinker_cookbook_recipes.py'


def runner():
    spec = importlib.util.spec_from_file_location('tinker_cookbook_recipes', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_warm_start_resumes_rl_loop_from_sl_loops_last_state(tmp_path):
    sl, rl = tmp_path / 'sl', tmp_path / 'rl'
    sl.mkdir()
    (sl / 'checkpoints.jsonl').write_text(
        json.dumps({'name': '000020', 'batch': 20, 'state_path': 'tinker://r/weights/000020'}) + '\n'
        + json.dumps({'name': 'final', 'batch': 64, 'state_path': 'tinker://r/weights/final',
                      'sampler_path': 'tinker://r/sampler_weights/final'}) + '\n')
    runner().warm_start(rl, sl)
    record = json.loads((rl / 'checkpoints.jsonl').read_text())
    # rl_loop resumes from its log folder's last record, at that record's batch: its own first batch.
    assert record == {'name': 'warm-start', 'batch': 0, 'state_path': 'tinker://r/weights/final'}


def test_recipe_overrides_name_the_loss_and_refuse_unknown_recipes(tmp_path):
    module = runner()
    size = {'sl_steps': 2, 'sl_batch': 4, 'sl_lr': 1e-3, 'rl_steps': 1, 'rl_batch': 1, 'group': 2, 'steps': 1}
    args = module.recipe_args('rl_loop:gspo', tmp_path, 'http://h', size)
    assert args[0] == 'tinker_cookbook.recipes.rl_loop' and 'loss_fn=gspo' in args
    assert f'model_name={module.MODEL_NAME}' in args and 'base_url=http://h' in args
    assert not any(a.startswith('loss_fn=') for a in module.recipe_args('rl_loop', tmp_path, 'http://h', size))
    with pytest.raises(SystemExit, match='unknown recipe'):
        module.recipe_args('sl_fancy', tmp_path, 'http://h', size)


def python312() -> str:
    candidate = os.environ.get('TWINKLE_PYTHON312') or shutil.which('python3.12')
    if candidate:
        env = {**os.environ, 'PYENV_VERSION': os.environ.get('PYENV_VERSION', '3.12.1')}
        out = subprocess.run([candidate, '-c', 'import sys; print(sys.version_info[:2] >= (3, 12))'],
                             capture_output=True, text=True, env=env)
        if out.returncode == 0 and out.stdout.strip() == 'True':
            return candidate
    pytest.skip('no Python 3.12 (python3.12 or TWINKLE_PYTHON312): tinker-cookbook needs it')


def run_recipes(tmp_path: Path, *args: str, timeout: float = 1200) -> dict:
    env = {**os.environ, 'PYENV_VERSION': os.environ.get('PYENV_VERSION', '3.12.1'),
           'PYTHONPATH': str(ROOT / 'src')}
    out = subprocess.run([sys.executable, str(SCRIPT), '--base-python', python312(), '--work-dir', str(tmp_path),
                          *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return {r['recipe']: r for r in json.loads(out.stdout.strip().splitlines()[-1])['results']}


def test_sl_loop_then_warm_started_rl_loop_earns_reward(tmp_path):
    results = run_recipes(tmp_path, '--recipes', 'sl_loop', 'rl_loop')
    sl, rl = results['sl_loop'], results['rl_loop']
    assert sl['finished'] and rl['finished']
    nll = sl['train_mean_nll']
    assert len(nll) == 32 and max(nll[-4:]) < 0.1 * nll[0], nll
    rewards = rl['reward/total']
    assert len(rewards) == 3
    # The reward comes from what sl_loop taught: the answers to these questions, written inside \boxed{}.
    assert max(rewards) > 0, rewards
    # rl_loop's default loss (stable_reinforce in 0.6.1) trained on at least one batch with mixed rewards.
    assert rl['steps_trained'] >= 1, rl
