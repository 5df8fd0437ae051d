import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from twinkle.assets import ASSETS_DIR, DATASETS, TINY_QWEN3_DIR

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def tok():
    return AutoTokenizer.from_pretrained(TINY_QWEN3_DIR)


def _rows(name):
    with open(DATASETS[name], encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def test_paths_exist():
    assert TINY_QWEN3_DIR.parent == ASSETS_DIR
    for name in ('tokenizer.json', 'tokenizer_config.json', 'config.json', 'generation_config.json'):
        assert (TINY_QWEN3_DIR / name).is_file(), name
    assert set(DATASETS) == {'self-cognition', 'alpaca-mini'}
    assert all(p.is_file() for p in DATASETS.values())


def test_tokenizer_basics(tok):
    assert tok.is_fast
    assert len(tok) == 4096
    assert tok.eos_token == '<|im_end|>'
    assert tok.pad_token == '<|endoftext|>'
    assert tok.bos_token is None
    # No BOS/EOS is added implicitly.
    assert tok('hi')['input_ids'] == tok.encode('hi', add_special_tokens=False)


@pytest.mark.parametrize('text', [
    'Hello, world! This is Twinkle.',
    '你是谁？我是一个人工智能助手，很高兴认识你。',
    'Mixed 中英文 text: 3.14159, 2024-05-17, x = 1_000_000;\n\tindent  two  spaces\n',
    'emoji 🙂 and accents: café naïve Ωmega',
])
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_digits_are_split(tok):
    ids = tok.encode('12345', add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ['1', '2', '3', '4', '5']


@pytest.mark.parametrize('token', [
    '<|endoftext|>', '<|im_start|>', '<|im_end|>', '<think>', '</think>', '<tool_call>', '</tool_call>',
])
def test_special_tokens_single_id(tok, token):
    ids = tok.encode(f'a{token}b', add_special_tokens=False)
    assert len(ids) == 3
    assert ids[1] == tok.convert_tokens_to_ids(token)


def test_chat_template_three_turns(tok):
    messages = [
        {'role': 'system', 'content': 'Be brief.'},
        {'role': 'user', 'content': 'who are you?'},
        {'role': 'assistant', 'content': 'I am Twinkle.'},
        {'role': 'user', 'content': '你好'},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        '<|im_start|>system\nBe brief.<|im_end|>\n'
        '<|im_start|>user\nwho are you?<|im_end|>\n'
        '<|im_start|>assistant\nI am Twinkle.<|im_end|>\n'
        '<|im_start|>user\n你好<|im_end|>\n'
        '<|im_start|>assistant\n'
    )
    # No default system prompt, and no generation prompt unless asked.
    text = tok.apply_chat_template(messages[1:3], tokenize=False)
    assert text == '<|im_start|>user\nwho are you?<|im_end|>\n<|im_start|>assistant\nI am Twinkle.<|im_end|>\n'


def test_chat_template_tools(tok):
    tools = [{'type': 'function', 'function': {'name': 'add', 'parameters': {'type': 'object'}}}]
    messages = [
        {'role': 'system', 'content': 'S'},
        {'role': 'user', 'content': '1+2?'},
        {'role': 'assistant', 'content': '', 'tool_calls': [
            {'type': 'function', 'function': {'name': 'add', 'arguments': {'a': 1, 'b': 2}}}]},
        {'role': 'tool', 'content': '3'},
        {'role': 'assistant', 'content': '3'},
    ]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    head, rest = text.split('<|im_end|>\n', 1)
    assert head.startswith('<|im_start|>system\nS\n\n# Tools\n')
    assert json.dumps(tools[0]) in head
    assert rest == (
        '<|im_start|>user\n1+2?<|im_end|>\n'
        '<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n'
        '<|im_start|>assistant\n3<|im_end|>\n'
    )


def test_model_config(tok):
    cfg = AutoConfig.from_pretrained(TINY_QWEN3_DIR)
    assert cfg.model_type == 'qwen3'
    assert cfg.vocab_size % 64 == 0 and cfg.vocab_size >= len(tok)
    assert cfg.eos_token_id == tok.convert_tokens_to_ids('<|im_end|>')
    assert cfg.pad_token_id == tok.convert_tokens_to_ids('<|endoftext|>')
    model = AutoModelForCausalLM.from_config(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    # embeddings 4096*256 (tied) + 4 layers of attention/MLP/norms + final norm
    layer = 256 * 256 + 2 * 256 * 128 + 256 * 256 + 3 * 256 * 768 + 2 * 256 + 2 * 64
    assert n_params == cfg.vocab_size * 256 + 4 * layer + 256


def test_self_cognition():
    rows = _rows('self-cognition')
    assert len(rows) >= 130
    for i, row in enumerate(rows):
        assert set(row) == {'query', 'response', 'lang'}, i
        assert row['lang'] in ('en', 'zh') and row['query'] and row['response'], i
    langs = [r['lang'] for r in rows]
    assert 0.4 < langs.count('en') / len(rows) < 0.6
    text = ''.join(r['response'] for r in rows)
    assert '{{NAME}}' in text and '{{AUTHOR}}' in text
    assert all('{{NAME}}' in r['response'] or '{{AUTHOR}}' in r['response'] for r in rows)
    queries = [r['query'] for r in rows]
    assert queries.count('who are you?') >= 2 and queries.count('Who are you?') >= 2
    assert any('\u4e00' <= ch <= '\u9fff' for r in rows if r['lang'] == 'zh' for ch in r['query'])


def test_alpaca_mini():
    rows = _rows('alpaca-mini')
    assert len(rows) >= 50
    for i, row in enumerate(rows):
        assert set(row) == {'instruction', 'input', 'output'}, i
        assert row['instruction'] and row['output'], i
    assert any(any('\u4e00' <= ch <= '\u9fff' for ch in r['instruction']) for r in rows)


def test_train_tokenizer_is_deterministic(tmp_path):
    subprocess.run([sys.executable, str(REPO / 'scripts' / 'train_tokenizer.py'), '--out', str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    new = json.loads((tmp_path / 'tokenizer.json').read_text(encoding='utf-8'))
    old = json.loads((TINY_QWEN3_DIR / 'tokenizer.json').read_text(encoding='utf-8'))
    assert new['model']['vocab'] == old['model']['vocab']
    assert new['model']['merges'] == old['model']['merges']
    assert new['added_tokens'] == old['added_tokens']
    assert json.loads((tmp_path / 'tokenizer_config.json').read_text(encoding='utf-8')) == \
        json.loads((TINY_QWEN3_DIR / 'tokenizer_config.json').read_text(encoding='utf-8'))
