"""Fill an offline Hugging Face cache with what the tinker-cookbook recipes load, so they run without the hub.

    python cookbook_offline_cache.py --hf-home DIR --tokenizer-dir src/twinkle/assets/tiny-qwen3 \\
        --model-name Qwen/Qwen3.5-9B-Base [--model-name ...]

Run it with the Python that runs the recipes (its ``datasets`` version writes the cache the recipes read).
It writes, under ``DIR``:

- the tokenizer files under every ``--model-name`` (hub cache layout), so ``AutoTokenizer.from_pretrained(name)``
  resolves offline;
- small stand-ins for ``HuggingFaceH4/no_robots`` (chat SFT), ``openai/gsm8k`` (config ``main``) and
  ``Anthropic/hh-rlhf`` (preference pairs) in the datasets cache, under those names.

The stand-ins are arithmetic questions in the recipes' own formats: the supervised set teaches answers written
inside ``\\boxed{}`` to exactly the questions the RL set asks (after the few-shot exchange ``rl_loop`` puts
before each question), so a tiny model fine-tuned on the first earns reward on the second.
"""
from __future__ import annotations

import argparse
import hashlib
import random
import shutil
from pathlib import Path
from typing import Dict, List

SUFFIX = ' Provide a numerical answer without units, written inside \\boxed{}.'
# rl_loop puts this exchange before every question; the supervised stand-in shows it too, so that what the
# model learns is conditioned on the very prompt it is later sampled with.
FEW_SHOT = [
    {'role': 'user', 'content': "How many r's are in strawberry?" + SUFFIX},
    {'role': 'assistant', 'content': "Let's spell the word out and number all the letters: 1) s 2) t 3) r 4) a "
                                     '5) w 6) b 7) e 8) r 9) r 10) y. We have r\'s at positions 3, 8, and 9. '
                                     '\\boxed{3}'},
]
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'config.json', 'generation_config.json',
                   'special_tokens_map.json')


def problems(count: int, seed: int) -> List[Dict[str, int]]:
    rng = random.Random(seed)
    return [{'a': rng.randint(1, 9), 'b': rng.randint(1, 9)} for _ in range(count)]


def question(p: Dict[str, int]) -> str:
    return f"Tom has {p['a']} apples and buys {p['b']} more. How many apples does he have?"


def gsm8k_rows(ps: List[Dict[str, int]]) -> List[Dict[str, str]]:
    return [{'question': question(p), 'answer': f"{p['a']} + {p['b']} = {p['a'] + p['b']}\n#### {p['a'] + p['b']}"}
            for p in ps]


def no_robots_rows(ps: List[Dict[str, int]], prefix_every: int = 1) -> List[Dict[str, object]]:
    rows = []
    for i, p in enumerate(ps):
        # One row in ``prefix_every`` carries rl_loop's few-shot exchange (most of a row's tokens). With the
        # default 1 every row does: the tiny model then learns its answers in the very context it is sampled in,
        # which needs fewer steps than learning them apart from it.
        prefix = FEW_SHOT if random.Random(i).randrange(prefix_every) == 0 else []
        messages = [*prefix, {'role': 'user', 'content': question(p) + SUFFIX},
                    {'role': 'assistant', 'content': f"\\boxed{{{p['a'] + p['b']}}}"}]
        rows.append({'prompt': question(p), 'prompt_id': f'{i:06d}', 'messages': messages, 'category': 'Math'})
    return rows


def hh_rlhf_rows(ps: List[Dict[str, int]]) -> List[Dict[str, str]]:
    rows = []
    for p in ps:
        turn = f"\n\nHuman: {question(p)}\n\nAssistant:"
        rows.append({'chosen': f"{turn} {p['a'] + p['b']}", 'rejected': f"{turn} {p['a'] * p['b'] + 1}"})
    return rows


def write_dataset(cache_dir: Path, repo_id: str, config_name: str, splits: Dict[str, list]) -> None:
    """Write splits where ``load_dataset(repo_id, config_name)`` looks offline: the datasets cache folder
    ``{org}___{name}/{config}/{version}/{hash}`` that a hub download fills, with its ``dataset_info.json``."""
    import json
    import tempfile

    from datasets.packaged_modules.json.json import Json

    org, name = repo_id.split('/')
    digest = hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()[:16]
    target = cache_dir / f'{org}___{name}' / config_name / '0.0.0' / digest
    if (target / 'dataset_info.json').is_file():
        return
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for split, rows in splits.items():
            path = Path(tmp) / f'{split}.jsonl'
            path.write_text(''.join(json.dumps(row) + '\n' for row in rows))
            files[split] = [str(path)]
        # The packaged JSON builder writes the arrow files and info (named after dataset_name); its folder is
        # keyed by the data files, so it is moved to where the cache lookup of the hub name expects it.
        builder = Json(cache_dir=str(Path(tmp) / 'build'), dataset_name=name, config_name=config_name,
                       data_files=files, hash=digest)
        builder.download_and_prepare()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(builder.cache_dir, target)


def write_tokenizer(hub_dir: Path, model_name: str, tokenizer_dir: Path) -> None:
    """Put the tokenizer files where the hub cache keeps ``model_name`` (a snapshot that refs/main names)."""
    repo = hub_dir / ('models--' + model_name.replace('/', '--'))
    revision = hashlib.sha1(model_name.encode()).hexdigest()
    snapshot = repo / 'snapshots' / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, snapshot / name)
    (repo / 'refs').mkdir(exist_ok=True)
    (repo / 'refs' / 'main').write_text(revision)


def build(hf_home: Path, tokenizer_dir: Path, model_names: List[str], train_size: int = 1024,
          distinct: int = 4) -> None:
    for name in model_names:
        write_tokenizer(hf_home / 'hub', name, tokenizer_dir)
    datasets_dir = hf_home / 'datasets'
    # A few distinct problems, repeated: the supervised warm-up can memorise them within a minute on a CPU.
    train = [ps for ps in problems(distinct, seed=0)] * (train_size // distinct)
    test = problems(distinct, seed=0) * 4  # at least one batch of the recipes' evaluators
    write_dataset(datasets_dir, 'HuggingFaceH4/no_robots', 'default',
                  {'train': no_robots_rows(train), 'test': no_robots_rows(test)})
    write_dataset(datasets_dir, 'openai/gsm8k', 'main', {'train': gsm8k_rows(train), 'test': gsm8k_rows(test)})
    write_dataset(datasets_dir, 'Anthropic/hh-rlhf', 'default',
                  {'train': hh_rlhf_rows(train), 'test': hh_rlhf_rows(test)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--hf-home', required=True, type=Path)
    parser.add_argument('--tokenizer-dir', required=True, type=Path)
    parser.add_argument('--model-name', action='append', required=True, dest='model_names')
    parser.add_argument('--train-size', type=int, default=1024)
    args = parser.parse_args()
    build(args.hf_home, args.tokenizer_dir, args.model_names, args.train_size)


if __name__ == '__main__':
    main()
