"""Wire encoding of arguments and results."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from twinkle.client import codec


def test_round_trip_of_tensors_arrays_and_containers():
    value = {'t': torch.arange(6, dtype=torch.int64).reshape(2, 3), 'f': torch.tensor([0.5, -1.25]),
             'bf': torch.tensor([1.5], dtype=torch.bfloat16), 'a': np.ones((2, 2), dtype=np.float32),
             'tuple': (1, 'x'), 'range': range(2, 10, 3), 'nested': [{'k': None}, True, 3.5]}
    back = codec.decode(codec.encode(value))
    assert torch.equal(back['t'], value['t']) and back['t'].dtype == torch.int64
    assert torch.equal(back['f'], value['f'])
    assert back['bf'].dtype == torch.float32 and float(back['bf'][0]) == 1.5
    assert torch.equal(back['a'], torch.ones(2, 2))
    assert back['tuple'] == (1, 'x') and back['range'] == range(2, 10, 3) and back['nested'] == value['nested']


def test_arrays_decode_to_numpy_or_lists_without_torch():
    encoded = codec.encode(np.array([[1, 2], [3, 4]], dtype=np.int64))
    arr = codec.decode(encoded, prefer='numpy')
    assert isinstance(arr, np.ndarray) and arr.tolist() == [[1, 2], [3, 4]]
    assert codec.decode(encoded, prefer='list') == [[1, 2], [3, 4]]
    assert codec.decode(codec.encode(torch.tensor([True, False])), prefer='list') == [True, False]


def test_configs_and_components():
    from peft import LoraConfig
    lora = codec.decode(codec.encode(LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj'], use_rslora=True)))
    assert (lora.r, lora.lora_alpha, lora.target_modules, lora.extra) == (4, 8, ['q_proj'], {'use_rslora': True})
    comp = codec.decode(codec.encode(codec.component('preprocessor', 'SelfCognitionProcessor', 'a', author='b')))
    assert (comp.kind, comp.name, comp.args, comp.kwargs) == ('preprocessor', 'SelfCognitionProcessor', ['a'],
                                                              {'author': 'b'})


def test_unsendable_values_and_malformed_arrays_explain_themselves():
    with pytest.raises(codec.CodecError, match="component\\('preprocessor', 'object'"):
        codec.encode({'x': object()})
    with pytest.raises(codec.CodecError, match='string keys'):
        codec.encode({1: 2})
    with pytest.raises(codec.CodecError, match='bytes'):
        codec.decode({'__ndarray__': {'dtype': 'float32', 'shape': [3], 'data': 'AAAA'}})
    with pytest.raises(codec.CodecError, match='dtype'):
        codec.decode({'__ndarray__': {'dtype': 'complex64', 'shape': [1], 'data': 'AAAAAAAAAAA='}})
