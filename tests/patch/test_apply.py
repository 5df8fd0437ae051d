import pytest
import torch

from twinkle.patch import Patch, apply_patch
from twinkle.registry import register


@register('patch')
class ScaleOutputPatch(Patch):
    """Test patch: multiply a module's forward output by ``factor`` on this instance only."""

    def __init__(self, factor: float = 2.0):
        super().__init__(factor=factor)
        self.factor = factor

    def _apply(self, module):
        original = module.forward
        module.forward = lambda *a, **k: original(*a, **k) * self.factor
        self._original = original

    def _revert(self, module):
        del module.forward


def test_apply_by_name_class_and_instance_then_revert():
    lin = torch.nn.Linear(2, 2)
    x = torch.ones(1, 2)
    base = lin(x)
    p = apply_patch(lin, 'ScaleOutputPatch', factor=3.0)
    assert torch.allclose(lin(x), 3 * base) and p.applied
    p.revert()
    assert torch.allclose(lin(x), base)
    with apply_patch(lin, ScaleOutputPatch, 2.0):
        assert torch.allclose(lin(x), 2 * base)
    assert torch.allclose(lin(x), base)
    q = ScaleOutputPatch(factor=5.0)
    assert apply_patch(lin, q) is q and torch.allclose(lin(x), 5 * base)
    q.revert()
    other = torch.nn.Linear(2, 2)
    ScaleOutputPatch(4.0)(other)  # calling a patch applies it
    assert torch.allclose(lin(x), base)


def test_callables_and_models_and_errors():
    seen = []
    assert apply_patch('target', lambda t, n: seen.append((t, n)) or 'done', 7) == 'done'
    assert seen == [('target', 7)]

    class FakeModel:
        def apply_patch(self, patch, **kwargs):
            self.got = (patch, kwargs)
            return 'tracked'

    model = FakeModel()
    assert apply_patch(model, 'ScaleOutputPatch', factor=2.0) == 'tracked'
    assert model.got == (ScaleOutputPatch, {'factor': 2.0})
    with pytest.raises(ValueError, match='target is None'):
        apply_patch(None, ScaleOutputPatch)
    with pytest.raises(TypeError, match='neither a registered patch name'):
        apply_patch(torch.nn.Linear(1, 1), 3)
