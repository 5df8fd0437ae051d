"""Checks shared by the sequence-splitting layouts (Ulysses, context parallel): a checkpoint saved in
the layout resumes there, resumes in one process, and holds the weights one process saves."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import _scenarios as S
from test_distributed import assert_close


def check_layout_checkpoint(ranks: List[Dict[str, Any]], single_full: Dict[str, Any]) -> None:
    import torch
    from safetensors.torch import load_file
    rank0 = ranks[0]
    # Resumed in the same layout: the steps after the checkpoint are the uninterrupted run's.
    assert rank0['resumed']['step'] == S.SAVE_AT
    assert_close(rank0['resumed']['losses'], rank0['losses'][S.SAVE_AT:])
    saved = load_file(str(Path(rank0['checkpoint']) / 'model.safetensors'))
    reference = load_file(str(Path(single_full['checkpoint']) / 'model.safetensors'))
    assert saved.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=2e-5, msg=key)
    # Across layouts: the same checkpoint resumed in one process.
    model = S.build(None)
    try:
        resumed = S.resume(model, rank0['checkpoint'])
    finally:
        model.shutdown()
    assert resumed['resumed_step'] == S.SAVE_AT
    assert_close(resumed['losses'], single_full['losses'][S.SAVE_AT:])
