"""A sharded optimizer checkpoint (DCP, keyed by parameter names) loads into an adapter of another name: the
names are mapped when only the adapter's name segment differs."""
from __future__ import annotations

from twinkle.model.transformers.distributed.optim_state import _adapter_renaming

OWN = ['base.layers.0.q_proj.lora_A.new.weight', 'base.layers.0.q_proj.lora_B.new.weight',
       'base.layers.1.q_proj.lora_A.new.weight', 'base.layers.1.q_proj.lora_B.new.weight']


def test_names_of_another_adapter_are_mapped():
    saved = {n.replace('.new.', '.old.') for n in OWN}
    mapping = _adapter_renaming(saved, OWN)
    assert mapping == {n: n.replace('.new.', '.old.') for n in OWN}


def test_matching_or_unrelated_names_are_left_alone():
    assert _adapter_renaming(set(OWN), OWN) == {}
    # Other modules, or another count of parameters: nothing is guessed (the load then says what is missing).
    assert _adapter_renaming({n.replace('q_proj', 'v_proj').replace('.new.', '.old.') for n in OWN}, OWN) == {}
    assert _adapter_renaming({n.replace('.new.', '.old.') for n in OWN[:2]}, OWN) == {}
    # Names differing in a layer index only are not another adapter's.
    shifted = {n.replace('layers.0', 'layers.2') for n in OWN}
    assert _adapter_renaming(shifted, OWN) == {}
