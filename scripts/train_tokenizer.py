"""Train the byte-level BPE tokenizer shipped with Twinkle's built-in ``tiny-qwen3`` model.

The result is deterministic: the same corpus files always give the same vocabulary and merges, so
``tests/assets/test_assets.py`` can retrain into a temporary directory and compare with the
committed ``tokenizer.json``.

Usage::

    python scripts/train_tokenizer.py                 # writes src/twinkle/assets/tiny-qwen3/
    python scripts/train_tokenizer.py --out /tmp/tok  # anywhere else
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / 'src' / 'twinkle' / 'assets'
DEFAULT_OUT = ASSETS / 'tiny-qwen3'
CORPUS_TEXT = Path(__file__).resolve().parent / 'tokenizer_corpus.txt'
DATASETS = [ASSETS / 'datasets' / 'self-cognition.jsonl', ASSETS / 'datasets' / 'alpaca-mini.jsonl']

VOCAB_SIZE = 4096
# Control tokens: never produced by splitting ordinary text, skipped when decoding with skip_special_tokens.
SPECIAL_TOKENS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
# Markup the model writes itself; kept whole, but decoded like text (as Qwen does).
MARKUP_TOKENS = ['<think>', '</think>', '<tool_call>', '</tool_call>', '<tool_response>', '</tool_response>']

# Contractions, letter runs (with one leading non-letter such as a space), single digits, punctuation
# runs, then whitespace; splitting digits one by one keeps numbers consistent for a tiny model.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Placeholders in self-cognition.jsonl are filled with a few names so both scripts get merges.
SAMPLE_IDENTITIES = [
    ('Twinkle', 'the Twinkle team'),
    ('Aster', 'Northwind Labs'),
    ('小星', '星辰实验室'),
    ('Mochi', 'a small open-source community'),
]

CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is none -%}"
    "{%- elif content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}{%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set ns = namespace(start=0) -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{{- render_content(messages[0].content) + '\\n\\n' -}}"
    "{%- set ns.start = 1 -%}"
    "{%- endif -%}"
    "{{- '# Tools\\n\\nThese functions are available. Their signatures are listed inside <tools></tools>:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nTo call a function, answer with a JSON object holding its name and arguments '"
    " + 'inside <tool_call></tool_call> tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<arguments-object>}\\n</tool_call><|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages[ns.start:] -%}"
    "{%- if message.role == 'tool' -%}"
    "{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + render_content(message.content) + '\\n</tool_response>' -}}"
    "{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- elif message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if message.reasoning_content -%}"
    "{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{{- render_content(message.content) -}}"
    "{%- for call in (message.tool_calls or []) -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{%- if loop.first and message.content -%}{{- '\\n' -}}{%- elif not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' -}}"
    "{%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + render_content(message.content) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


def corpus() -> Iterator[str]:
    """Yield training texts in a fixed order (the order is part of what makes training deterministic)."""
    yield from CORPUS_TEXT.read_text(encoding='utf-8').split('\n\n')
    for path in DATASETS:
        for line in path.read_text(encoding='utf-8').splitlines():
            row = json.loads(line)
            if 'query' in row:
                for name, author in SAMPLE_IDENTITIES:
                    text = f"{row['query']}\n{row['response']}"
                    yield text.replace('{{NAME}}', name).replace('{{AUTHOR}}', author)
            else:
                yield '\n'.join(v for v in (row['instruction'], row['input'], row['output']) if v)


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior='isolated', invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=0,
        # Long Chinese runs are one pre-token; without a cap whole memorised phrases become tokens.
        max_token_length=12,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS + MARKUP_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Registered before training so the corpus's literal '<|im_start|>' etc. are not learned as merges.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def tokenizer_config(tok: Tokenizer) -> dict:
    added = {}
    for token in SPECIAL_TOKENS + MARKUP_TOKENS:
        added[str(tok.token_to_id(token))] = {
            'content': token, 'lstrip': False, 'normalized': False, 'rstrip': False,
            'single_word': False, 'special': token in SPECIAL_TOKENS,
        }
    return {
        'tokenizer_class': 'PreTrainedTokenizerFast',
        'added_tokens_decoder': added,
        'bos_token': None,
        'eos_token': '<|im_end|>',
        'pad_token': '<|endoftext|>',
        'unk_token': None,
        'additional_special_tokens': ['<|im_start|>', '<|im_end|>'],
        'add_bos_token': False,
        'add_prefix_space': False,
        'clean_up_tokenization_spaces': False,
        'errors': 'replace',
        'model_max_length': 4096,
        'split_special_tokens': False,
        'chat_template': CHAT_TEMPLATE,
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', type=Path, default=DEFAULT_OUT, help='output directory (default: %(default)s)')
    args = parser.parse_args(argv)
    tok = build_tokenizer()
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise SystemExit(
            f'trained vocabulary has {tok.get_vocab_size()} entries, expected {VOCAB_SIZE}: '
            f'add more text to {CORPUS_TEXT} so enough merges exist')
    args.out.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out / 'tokenizer.json'), pretty=True)
    with open(args.out / 'tokenizer_config.json', 'w', encoding='utf-8') as f:
        json.dump(tokenizer_config(tok), f, ensure_ascii=False, indent=2)
        f.write('\n')
    print(f'wrote {args.out} (vocab {tok.get_vocab_size()})')
    return args.out


if __name__ == '__main__':
    main()
