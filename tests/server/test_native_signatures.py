"""The server's native model methods take exactly the parameters of the model methods they stand for."""
from __future__ import annotations

import inspect

import pytest

from twinkle.model.transformers.model import TransformersModel as LocalModel
from twinkle.server import native_model
from twinkle.server.errors import BadRequest
from twinkle.server.native_model import PASS_THROUGH, NativeModelHandle, signature_drift
from twinkle.wire.methods import MODEL


def test_every_method_matches_the_model_signature():
    assert signature_drift() == []
    for name in MODEL.methods:
        mine = inspect.signature(getattr(NativeModelHandle, f'do_{name}'))
        theirs = inspect.signature(getattr(LocalModel, name))
        extras = set(native_model.SERVER_EXTRAS.get(name, ()))
        assert [p for p in mine.parameters if p not in extras] == list(theirs.parameters), name


def test_a_drifted_method_is_reported(monkeypatch):
    def do_clip_grad_norm(self, max_norm: float = 1.0, *, adapter_name=None):  # renamed first parameter
        return None
    monkeypatch.setattr(NativeModelHandle, 'do_clip_grad_norm', do_clip_grad_norm)
    drift = signature_drift()
    assert len(drift) == 1 and drift[0].startswith('clip_grad_norm:') and 'max_norm' in drift[0]
    monkeypatch.setitem(PASS_THROUGH, 'reset_everything', False)
    assert 'reset_everything: passed through but not declared' in signature_drift()


def test_pass_through_methods_are_generated_and_check_their_arguments():
    for name in PASS_THROUGH:
        fn = getattr(NativeModelHandle, f'do_{name}')
        assert fn.__name__ == f'do_{name}'
        assert inspect.signature(fn) == inspect.signature(getattr(LocalModel, name))
    # Arguments are bound before any adapter is looked up: a wrong call is a 400 naming the method.
    with pytest.raises(BadRequest, match=r"step\(\): .*unexpected keyword argument 'lr'"):
        NativeModelHandle.do_step(object(), lr=0.1)
    with pytest.raises(BadRequest, match=r'calculate_metric\(\): too many positional arguments'):
        NativeModelHandle.do_calculate_metric(object(), True, False)
