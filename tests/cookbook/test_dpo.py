"""cookbook/dpo.py learns: the preference margin starts at 0 (LoRA starts as the identity) and rises, and
the implicit reward comes to rank chosen above rejected on pairs never trained on."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location('cookbook_dpo',
                                               Path(__file__).resolve().parents[2] / 'cookbook' / 'dpo.py')
dpo = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(dpo)


def test_dpo_margin_rises(tmp_path):
    history = dpo.main(['--steps', '12', '--quiet', '--output-dir', str(tmp_path)])
    steps, final = history[:-1], history[-1]
    margins = [h['reward_margin'] for h in steps]
    assert abs(margins[0]) < 1e-5  # the policy equals the reference before the first update
    assert sum(margins[-4:]) / 4 > 0.1, margins
    assert final['eval_reward_margin'] > 0.1 and final['eval_reward_accuracy'] > 0.7, final
    # Held-out pairs: every pair ties before training (chance, 0.5), then the ranking generalises.
    before = json.loads((tmp_path / 'history.json').read_text())['before']
    held_out = [h['held_out_accuracy'] for h in steps]
    assert before['accuracy'] == 0.5 and abs(before['margin']) < 1e-5, before
    assert sum(held_out[-5:]) / 5 >= before['accuracy'] + 0.3, held_out
    assert sum(held_out[-5:]) / 5 >= 0.8 and final['eval_reward_accuracy'] >= 0.8, held_out


def test_bad_preference_file(tmp_path):
    path = tmp_path / 'pairs.jsonl'
    path.write_text('{"messages": [], "chosen": "a"}\n')
    with pytest.raises(ValueError, match=r"line 1 lacks \['rejected'\]"):
        dpo.load_pairs(str(path))
