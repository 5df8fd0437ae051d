"""cookbook/dpo.py learns: the preference margin starts at 0 (LoRA starts as the identity) and rises."""
from __future__ import annotations

import importlib.util
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


def test_bad_preference_file(tmp_path):
    path = tmp_path / 'pairs.jsonl'
    path.write_text('{"messages": [], "chosen": "a"}\n')
    with pytest.raises(ValueError, match=r"line 1 lacks \['rejected'\]"):
        dpo.load_pairs(str(path))
