"""The official tinker-cookbook recipes, unchanged, against a local ``twinkle serve``.

    python cookbook/client/tinker_cookbook_recipes.py                      # sl_loop, then rl_loop warm-started
    python cookbook/client/tinker_cookbook_recipes.py --recipes sl_basic rl_basic rl_loop:gspo dpo

It sets up everything the recipes need, offline:

1. a Python 3.12 venv with ``tinker==0.38.0`` and ``tinker-cookbook[math-rl]==0.5.8`` (one pip command, cached
   under ``~/.cache/twinkle-test-venvs``), plus the 0.6.1 wheel's files, which go ahead of 0.5.8 on PYTHONPATH
   (``--cookbook 0.6.1``, the default; 0.6.1 itself needs a ``tml-renderers`` the package index lacks);
2. a Hugging Face cache (``HF_HOME``) with the embedded tiny model's tokenizer under the recipes' model names and
   small stand-ins for the data sets they load (see ``cookbook_offline_cache.py``);
3. ``twinkle serve`` on the embedded tiny model, under the recipes' default model name plus aliases;

then runs each recipe as ``python -m tinker_cookbook.recipes...`` with small sizes given as the recipes' own
command-line overrides. ``rl_loop`` starts from ``sl_loop``'s final state when both run (the recipe resumes from
the ``checkpoints.jsonl`` of its log folder), so the tiny model earns reward. The last line printed is a JSON
summary: per recipe, whether it finished and its logged rewards or losses.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TOKENIZER_DIR = ROOT / 'src' / 'twinkle' / 'assets' / 'tiny-qwen3'
VENV_CACHE = Path(os.environ.get('TWINKLE_TEST_VENVS', Path.home() / '.cache' / 'twinkle-test-venvs'))
REQUIREMENTS = ['tinker==0.38.0', 'tinker-cookbook[math-rl]==0.5.8']
NEWER_COOKBOOK = 'tinker-cookbook==0.6.1'
MODEL_NAME = 'Qwen/Qwen3.5-9B-Base'            # every recipe's default model
RENDERER = 'role_colon'                         # the cookbook's renderer for MODEL_NAME (a base model)
ALIASES = ['Qwen/Qwen3-8B', 'meta-llama/Llama-3.2-1B']
API_KEY = 'tml-cookbook-recipes-0123456789'
RL_LOSSES = ('stable_reinforce', 'importance_sampling', 'cispo', 'gspo')


def ensure_venv(base_python: List[str]) -> Path:
    """The cookbook venv (cached by requirement list and base Python version); builds it on first use."""
    version = subprocess.run([*base_python, '-c', 'import sys; print(sys.version)'], capture_output=True,
                             text=True, check=True).stdout.strip()
    digest = hashlib.sha256(' '.join(REQUIREMENTS + [NEWER_COOKBOOK, version]).encode()).hexdigest()[:16]
    env_dir = VENV_CACHE / f'cookbook-{digest}'
    python = env_dir / 'bin' / 'python'
    if (env_dir / 'installed').is_file():
        return env_dir
    shutil.rmtree(env_dir, ignore_errors=True)
    subprocess.run([*base_python, '-m', 'venv', str(env_dir)], check=True)
    pip = [str(python), '-m', 'pip', '--disable-pip-version-check', '-q']
    subprocess.run([*pip, 'install', *REQUIREMENTS], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([*pip, 'download', '--no-deps', NEWER_COOKBOOK, '-d', tmp], check=True)
        wheel = next(Path(tmp).glob('tinker_cookbook-*.whl'))
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(env_dir / 'cookbook-0.6.1')
    (env_dir / 'installed').write_text('ok\n')
    return env_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's process: end it when this script ends, even when the script is killed (Linux)."""
    if sys.platform.startswith('linux'):
        import ctypes
        ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """``twinkle serve`` in a subprocess of this (the project's) Python."""

    def __init__(self, work: Path, model: str) -> None:
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        config = work / 'server.yaml'
        # Recipes rarely close their sessions: a short timeout frees their adapters soon after they exit.
        config.write_text('session_timeout_s: 20\nlimits:\n  max_adapters_per_tenant: 16\n')
        cmd = [sys.executable, '-m', 'twinkle.cli', 'serve', '--model', model, '--model-name', MODEL_NAME,
               '--port', str(self.port), '--data-dir', str(work / 'server-data'), '--api-key', API_KEY,
               '--config', str(config), '--log-level', 'warning']
        for alias in ALIASES:
            cmd += ['--model-alias', alias]
        env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT / 'src'), os.environ.get('PYTHONPATH', '')])}
        # The tiny model gains nothing from several threads, and on a busy machine torch's thread pool spends
        # most of each step waiting at barriers for its other threads to be scheduled.
        env.setdefault('OMP_NUM_THREADS', '1')
        self.log = open(work / 'server.log', 'w')
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=_die_with_parent)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f'twinkle serve exited; see {work / "server.log"}')
            try:
                urllib.request.urlopen(self.url + '/api/v1/healthz', timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError('twinkle serve did not answer /api/v1/healthz within 180 s')

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def recipe_args(recipe: str, log: Path, url: str, size: Dict[str, int]) -> List[str]:
    """Module and command-line overrides for one recipe (``rl_loop:<loss>`` selects rl_loop's loss)."""
    name, _, loss = recipe.partition(':')
    common = [f'base_url={url}', f'model_name={MODEL_NAME}', f'log_path={log}']
    if name == 'sl_loop':
        return ['tinker_cookbook.recipes.sl_loop', *common, f"batch_size={size['sl_batch']}",
                f"max_steps={size['sl_steps']}", f"learning_rate={size['sl_lr']}", 'lora_rank=8', 'save_every=0',
                'max_length=512', 'train_on_what=last_assistant_message']
    if name == 'rl_loop':
        return ['tinker_cookbook.recipes.rl_loop', *common, f"batch_size={size['rl_batch']}",
                f"group_size={size['group']}", f"max_steps={size['rl_steps']}", 'max_tokens=16',
                'learning_rate=1e-3', 'lora_rank=8', 'save_every=0', *([f'loss_fn={loss}'] if loss else [])]
    # sl_basic and rl_basic build their data set object in code; chz only takes sizes for it when the command
    # line names the builder class as well, with every field the recipe filled in.
    if name == 'sl_basic':
        data = 'dataset_builder.common_config'
        return ['tinker_cookbook.recipes.sl_basic', *common,
                'dataset_builder=tinker_cookbook.recipes.chat_sl.chat_datasets:NoRobotsBuilder',
                f'{data}.model_name_for_tokenizer={MODEL_NAME}', f'{data}.renderer_name={RENDERER}',
                f"{data}.batch_size={size['sl_batch']}", f'{data}.max_length=512', f"max_steps={size['steps']}",
                'lora_rank=8', 'eval_every=2', 'save_every=0']
    if name == 'rl_basic':
        return ['tinker_cookbook.recipes.rl_basic', *common,
                'dataset_builder=tinker_cookbook.recipes.math_rl.math_env:Gsm8kDatasetBuilder',
                f'dataset_builder.model_name_for_tokenizer={MODEL_NAME}', f'dataset_builder.renderer_name={RENDERER}',
                f"dataset_builder.batch_size={size['rl_batch']}", f"dataset_builder.group_size={size['group']}",
                f"max_steps={size['steps']}", 'max_tokens=16', 'lora_rank=8', 'save_every=0']
    if name == 'dpo':
        return ['tinker_cookbook.recipes.preference.dpo.train', *common, f"batch_size={size['sl_batch']}",
                f"max_steps={size['steps']}", 'max_length=512', 'behavior_if_log_dir_exists=delete']
    raise SystemExit(f'unknown recipe {recipe!r}; choose sl_loop, rl_loop[:loss], sl_basic, rl_basic or dpo')


def warm_start(rl_log: Path, sl_log: Path) -> None:
    """Let rl_loop resume from sl_loop's final state: the recipe resumes from its log folder's last record."""
    records = [json.loads(line) for line in (sl_log / 'checkpoints.jsonl').read_text().splitlines() if line]
    state = next(r['state_path'] for r in reversed(records) if r.get('state_path'))
    rl_log.mkdir(parents=True, exist_ok=True)
    (rl_log / 'checkpoints.jsonl').write_text(json.dumps({'name': 'warm-start', 'batch': 0,
                                                          'state_path': state}) + '\n')


def metrics(log: Path) -> List[dict]:
    path = log / 'metrics.jsonl'
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def summarise(recipe: str, log: Path, finished: bool, output: str) -> dict:
    rows = metrics(log)
    out: dict = {'recipe': recipe, 'finished': finished, 'steps_logged': len(rows)}
    if recipe.startswith('rl_loop'):
        # rl_loop skips the training step of a batch whose rewards are all equal (no advantage to learn from).
        out['steps_trained'] = len(rows) - output.count('skipping training step')
    for key in ('reward/total', 'env/all/reward/total', 'train_mean_nll', 'dpo_loss', 'train/dpo_loss'):
        values = [row[key] for row in rows if key in row]
        if values:
            out[key] = [round(float(v), 4) for v in values]
    return out


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--recipes', nargs='+', default=['sl_loop', 'rl_loop'],
                        help='sl_loop, rl_loop[:loss], sl_basic, rl_basic, dpo (loss: ' + ', '.join(RL_LOSSES) + ')')
    parser.add_argument('--cookbook', choices=('0.5.8', '0.6.1'), default='0.6.1')
    parser.add_argument('--base-python', default='python3.12', help='Python 3.12 for the cookbook venv')
    parser.add_argument('--work-dir', type=Path, help='where logs, the HF cache and server data go (default: temp)')
    parser.add_argument('--url', help='a running server (then give its key in TINKER_API_KEY); default: start one')
    parser.add_argument('--model', default='builtin://tiny-qwen3', help='what twinkle serve loads')
    parser.add_argument('--sl-steps', type=int, default=32)
    parser.add_argument('--sl-batch', type=int, default=8)
    parser.add_argument('--sl-lr', type=float, default=3e-3)
    parser.add_argument('--rl-steps', type=int, default=3)
    parser.add_argument('--rl-batch', type=int, default=2)
    parser.add_argument('--group', type=int, default=8)
    parser.add_argument('--steps', type=int, default=2, help='steps of sl_basic, rl_basic and dpo')
    parser.add_argument('--timeout', type=float, default=900, help='seconds per recipe')
    args = parser.parse_args(argv)
    size = {'sl_steps': args.sl_steps, 'sl_batch': args.sl_batch, 'sl_lr': args.sl_lr, 'rl_steps': args.rl_steps,
            'rl_batch': args.rl_batch, 'group': args.group, 'steps': args.steps}

    env_dir = ensure_venv(args.base_python.split())
    work = args.work_dir or Path(tempfile.mkdtemp(prefix='tinker-cookbook-'))
    work.mkdir(parents=True, exist_ok=True)
    hf_home = work / 'hf-home'
    python = str(env_dir / 'bin' / 'python')
    subprocess.run([python, str(HERE / 'cookbook_offline_cache.py'), '--hf-home', str(hf_home), '--tokenizer-dir',
                    str(TOKENIZER_DIR), *[a for n in [MODEL_NAME, *ALIASES] for a in ('--model-name', n)]],
                   check=True, env={**os.environ, 'HF_HOME': str(hf_home), 'HF_HUB_OFFLINE': '1'})
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1',
               TINKER_API_KEY=os.environ.get('TINKER_API_KEY', API_KEY) if args.url else API_KEY,
               WANDB_MODE='disabled', TOKENIZERS_PARALLELISM='false', OMP_NUM_THREADS='1')
    if args.cookbook == '0.6.1':
        env['PYTHONPATH'] = str(env_dir / 'cookbook-0.6.1')

    server = None if args.url else Server(work, args.model)
    url = args.url or server.url
    results = []
    try:
        for recipe in args.recipes:
            log = work / 'runs' / recipe.replace(':', '-')
            if recipe.startswith('rl_loop') and 'sl_loop' in args.recipes:
                warm_start(log, work / 'runs' / 'sl_loop')
            cmd = [python, '-m', *recipe_args(recipe, log, url, size)]
            print(f'== {recipe}: {" ".join(cmd[2:])}', flush=True)
            started = time.time()
            with open(work / f"{recipe.replace(':', '-')}.log", 'w') as out:
                proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=args.timeout,
                                      cwd=work)
            finished = proc.returncode == 0
            result = summarise(recipe, log, finished, (work / f"{recipe.replace(':', '-')}.log").read_text())
            result['seconds'] = round(time.time() - started, 1)
            results.append(result)
            print(json.dumps(result), flush=True)
            if not finished:
                print((work / f"{recipe.replace(':', '-')}.log").read_text()[-4000:], file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
    summary = {'work_dir': str(work), 'cookbook': args.cookbook, 'results': results}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == '__main__':
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up in main's finally
    done = main()
    sys.exit(0 if all(r['finished'] for r in done['results']) else 1)
