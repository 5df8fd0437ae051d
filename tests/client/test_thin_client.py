"""The client works where torch, transformers, numpy and peft are not installed (the 'client' extra)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from .conftest import KEY, MODEL

SCRIPT = textwrap.dedent(f"""
    import sys
    for name in ('torch', 'transformers', 'numpy', 'peft', 'tinker', 'datasets'):
        sys.modules[name] = None          # any import of them now fails
    import twinkle
    from twinkle.client import LoraConfig, TransformersModel
    client = twinkle.init_twinkle_client(sys.argv[1], sys.argv[2])
    model = TransformersModel(model_id={MODEL!r})
    model.add_adapter_to_model('default', LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj']))
    model.set_optimizer('AdamW', lr=1e-2)
    batch = [{{'input_ids': list(range(10, 30)), 'labels': list(range(10, 30))}}] * 2
    losses = []
    for _ in range(3):
        losses.append(model.forward_backward(inputs=batch)['loss'])
        model.clip_grad_and_step()
    assert losses[2] < losses[0], losses
    state = model.get_state_dict()
    first = next(iter(state.values()))
    assert isinstance(first, list) and isinstance(first[0], list), type(first)   # arrays as nested lists
    trajectory = {{'messages': [{{'role': 'user', 'content': 'hi'}}, {{'role': 'assistant', 'content': 'hello'}}]}}
    assert model.forward_only(inputs=[trajectory])['loss'] > 0                    # the server encodes it
    print('path', model.save('thin'))
    for name in ('torch', 'transformers', 'numpy'):
        assert sys.modules[name] is None
    print('ok', losses)
""")


def test_thin_client_without_torch(server):
    out = subprocess.run([sys.executable, '-c', SCRIPT, server.url, KEY], capture_output=True, text=True,
                         timeout=600, env={**os.environ})
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'ok' in out.stdout and 'twinkle://' in out.stdout
