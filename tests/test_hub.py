"""Id resolution: builtin, local, and the real huggingface_hub code path against a prepared offline cache."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from twinkle.hub import BUILTIN_DATASETS, HubError, resolve


def _prepare_hf_cache(cache: Path, repo_id: str, files: dict, repo_type: str = 'model') -> Path:
    """Lay out a Hugging Face hub cache the way snapshot_download leaves it."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / f'{repo_type}s--{repo_id.replace("/", "--")}'
    snapshot = repo / 'snapshots' / commit
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, snapshot / name)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(commit)
    return snapshot


def test_builtin_model_is_a_plain_transformers_folder():
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    folder = resolve('builtin://tiny-qwen3')
    assert resolve('builtin://tiny-qwen3') == folder  # materialised once
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == 'qwen3'
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == '<|im_end|>'
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == 4_197_120


def test_builtin_weights_are_identical_everywhere(tmp_path):
    """A fresh cache in another process materialises byte-identical weights."""
    folder = Path(resolve('builtin://tiny-qwen3'))
    code = 'from twinkle.hub import resolve; print(resolve("builtin://tiny-qwen3"))'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                         env={**__import__('os').environ, 'TWINKLE_CACHE_DIR': str(tmp_path)})
    assert out.returncode == 0, out.stderr
    other = Path(out.stdout.strip().splitlines()[-1])
    assert other != folder
    assert (other / 'model.safetensors').read_bytes() == (folder / 'model.safetensors').read_bytes()


def test_builtin_weights_are_written_by_a_rank_other_than_zero(tmp_path):
    """The process that wins the cache lock writes the weights even when it is not rank 0 of a process group
    (transformers' save_pretrained alone writes only on rank 0): here transformers sees rank 1 of a group."""
    folder = Path(resolve('builtin://tiny-qwen3'))
    code = ('import transformers.distributed.mixin as mu\n'
            'mu._is_torch_distributed_initialized = lambda: True\n'
            'mu._get_torch_distributed_rank = lambda: 1\n'
            'from twinkle.hub import resolve; print(resolve("builtin://tiny-qwen3"))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                         env={**__import__('os').environ, 'TWINKLE_CACHE_DIR': str(tmp_path)})
    assert out.returncode == 0, out.stderr
    other = Path(out.stdout.strip().splitlines()[-1])
    assert (other / 'model.safetensors').read_bytes() == (folder / 'model.safetensors').read_bytes()


def test_builtin_datasets_and_unknown_ids():
    assert resolve('builtin://self-cognition') == str(BUILTIN_DATASETS['self-cognition'])
    with pytest.raises(HubError, match='builtin://tiny-qwen3'):
        resolve('builtin://nope')
    with pytest.raises(HubError, match="neither an existing local path"):
        resolve('./does/not/exist')


def test_local_path(tmp_path):
    assert resolve(str(tmp_path)) == str(tmp_path.resolve())


def test_hf_id_resolves_offline_from_a_prepared_cache(tmp_path, monkeypatch):
    src = Path(resolve('builtin://tiny-qwen3'))
    cache = tmp_path / 'hub'
    files = {name: src / name for name in ('config.json', 'tokenizer.json', 'tokenizer_config.json',
                                           'model.safetensors')}
    snapshot = _prepare_hf_cache(cache, 'acme/tiny', files)
    code = ('from twinkle.hub import resolve; from transformers import AutoModelForCausalLM;'
            'p = resolve("hf://acme/tiny"); AutoModelForCausalLM.from_pretrained(p); print(p)')
    env = {**__import__('os').environ, 'HF_HUB_CACHE': str(cache), 'HF_HUB_OFFLINE': '1'}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip().splitlines()[-1]).resolve() == snapshot.resolve()
    # A repo missing from the cache fails with a message that says what to do.
    code = 'from twinkle.hub import resolve; resolve("hf://acme/missing")'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode != 0 and 'HF_HUB_OFFLINE is set' in out.stderr


def test_hf_dataset_id_resolves_offline(tmp_path):
    cache = tmp_path / 'hub'
    snapshot = _prepare_hf_cache(cache, 'acme/data', {'train.jsonl': BUILTIN_DATASETS['alpaca-mini']},
                                 repo_type='dataset')
    code = 'from twinkle.hub import resolve; print(resolve("hf://acme/data", repo_type="dataset"))'
    env = {**__import__('os').environ, 'HF_HUB_CACHE': str(cache), 'HF_HUB_OFFLINE': '1'}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip().splitlines()[-1]).resolve() == snapshot.resolve()


def test_modelscope_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, 'modelscope', None)  # as if not installed
    with pytest.raises(HubError, match=r"pip install 'twinkle\[modelscope\]'"):
        resolve('ms://Qwen/Qwen3-0.6B')
