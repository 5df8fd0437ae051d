"""``twinkle.patch.apply_patch`` as a function, on a twinkle model."""
import torch

from twinkle.model import TransformersModel
from twinkle.patch import ChunkedCrossEntropyPatch, apply_patch


def test_apply_patch_function_on_a_model():
    torch.manual_seed(0)
    model = TransformersModel(model_id='builtin://tiny-qwen3', mixed_precision='no')
    ids = list(range(5, 21))
    batch = [{'input_ids': ids, 'labels': [-100] * 4 + ids[4:]}]
    plain = model.forward_only(inputs=batch)
    patch = apply_patch(model, 'ChunkedCrossEntropyPatch', chunk_size=4)
    assert isinstance(patch, ChunkedCrossEntropyPatch) and patch.applied
    chunked = model.forward_only(inputs=batch)
    assert torch.allclose(plain['logps'], chunked['logps'], atol=1e-5)
    patch.revert()
    assert model.forward_only(inputs=batch)['logits'] is not None
