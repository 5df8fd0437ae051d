"""The native API through the client proxies: the local training code, run on the server."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from twinkle.client import (
    DataLoader,
    Dataset,
    DatasetMeta,
    RemoteError,
    RemoteObject,
    TransformersModel as RemoteModel,
    TwinkleClient,
    component,
)

from .conftest import KEY_B, MODEL

LORA = dict(r=8, lora_alpha=32, lora_dropout=0.0, target_modules='all-linear')


def samples(n: int = 4, offset: int = 0):
    g = torch.Generator().manual_seed(offset)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 4000, (int(torch.randint(6, 14, (1,), generator=g)),), generator=g).tolist()
        out.append({'input_ids': ids, 'labels': [-100] * 3 + ids[3:]})
    return out




def local_losses(batches, steps_lora=LORA):
    from twinkle.model import TransformersModel
    model = TransformersModel(model_id=MODEL, mixed_precision='no')
    torch.manual_seed(42)  # the server seeds each new adapter with 42 unless told otherwise
    model.add_adapter_to_model('default', LoraConfig(**steps_lora), gradient_accumulation_steps=1)
    model.set_optimizer('AdamW', lr=1e-3)
    out = []
    for batch in batches:
        out.append(model.forward_backward(inputs=batch)['loss'])
        model.clip_grad_and_step()
    return out


def test_local_code_runs_remotely_with_the_same_losses(connected):
    from twinkle.model import TransformersModel
    model = TransformersModel(model_id=MODEL, remote_group='default')   # the construct hook makes it a proxy
    assert isinstance(model, RemoteObject)
    model.add_adapter_to_model('default', LoraConfig(**LORA), gradient_accumulation_steps=1)
    model.set_optimizer('AdamW', lr=1e-3)
    batches = [samples(4, i) for i in range(3)]
    remote_losses = []
    for batch in batches:
        remote_losses.append(model.forward_backward(inputs=batch)['loss'])
        assert model.clip_grad_and_step()['stepped']
    assert remote_losses == pytest.approx(local_losses(batches), rel=1e-6)
    metric = model.calculate_metric(is_training=True)
    assert metric['step'] == 3
    configs = model.get_train_configs()
    assert configs['adapter_name'] == 'default' and configs['model_id'] == MODEL
    model.release()


def test_forward_loss_backward_handles_and_forward_only(connected):
    model = RemoteModel(model_id=MODEL)
    model.add_adapter_to_model('a', LoraConfig(**LORA))
    model.set_optimizer('AdamW', lr=1e-3)
    batch = samples(3)
    evaluated = model.forward_only(inputs=batch)
    assert isinstance(evaluated['logps'], torch.Tensor) and evaluated['logps'].shape[0] == 3
    outputs = model.forward(inputs=batch)
    loss = model.calculate_loss(outputs)
    assert loss.loss == pytest.approx(evaluated['loss'], rel=1e-5)   # same weights, same batch
    model.backward(loss)
    norm = model.clip_grad_norm(1.0)
    assert norm > 0
    model.step()
    model.zero_grad()
    assert model.forward_only(inputs=batch)['loss'] < evaluated['loss']
    model.release()


def test_checkpoints_are_named_by_path_and_resume(connected):
    model = RemoteModel(model_id=MODEL)
    model.add_adapter_to_model('default', LoraConfig(**LORA))
    model.set_optimizer('AdamW', lr=1e-3)
    model.forward_backward(inputs=samples(2))
    model.clip_grad_and_step()
    path = model.save('ckpt-1', save_optimizer=True)
    assert path.startswith('twinkle://run-') and path.endswith('/weights/ckpt-1')
    assert path in [c['path'] for c in connected.list_checkpoints()]
    state = model.get_state_dict()
    other = RemoteModel(model_id=MODEL)
    other.add_adapter_to_model('copy', path)                       # an adapter straight from the checkpoint
    restored = other.get_state_dict()
    assert set(state) == set(restored)
    assert all(torch.equal(state[k], restored[k]) for k in state)
    third = RemoteModel(model_id=MODEL)
    third.add_adapter_to_model('default', LoraConfig(**LORA))
    third.set_optimizer('AdamW', lr=1e-3)
    assert third.resume_from_checkpoint(path)['cur_step'] == 1
    for obj in (model, other, third):
        obj.release()


def test_refused_operations_explain_why(connected):
    model = RemoteModel(model_id=MODEL)
    with pytest.raises(RemoteError, match='add_adapter_to_model'):
        model.forward_backward(inputs=samples(1))
    model.add_adapter_to_model('default', LoraConfig(**LORA))
    with pytest.raises(RemoteError) as err:
        model.apply_patch('ChunkedCrossEntropy')
    assert err.value.status == 403
    with pytest.raises(RemoteError, match='output_dir') as err:
        model.save('x', output_dir='/tmp/elsewhere')
    assert err.value.status == 400
    with pytest.raises(RemoteError, match='bias'):
        model.add_adapter_to_model('b', LoraConfig(r=4, bias='all'))
    with pytest.raises(RemoteError, match='server paths'):
        model.load('/etc/passwd')
    with pytest.raises(RemoteError, match='not served'):
        RemoteModel(model_id='hf://Qwen/Qwen3-8B')
    # generate is checked like training input: ids inside the vocabulary, size within the limits.
    with pytest.raises(RemoteError, match='outside the vocabulary') as err:
        model.generate([[1, 2, 10 ** 6]], max_new_tokens=2)
    assert err.value.status == 400
    with pytest.raises(RemoteError, match='max_tokens_per_request') as err:
        model.generate([[5] * 4000] * 64, max_new_tokens=2)
    assert err.value.status == 413
    assert len(model.generate([[5, 6, 7]], max_new_tokens=2)[0]['token_ids']) <= 2
    model.release()


def test_objects_are_private_to_their_tenant(server, connected):
    model = RemoteModel(model_id=MODEL)
    model.add_adapter_to_model('default', LoraConfig(**LORA))
    with TwinkleClient(server.url, KEY_B) as other:
        with pytest.raises(RemoteError) as err:
            other.call(model._object_id, 'get_state_dict', [], {})
        assert err.value.status == 404
        mine = {r['run_id'] for r in connected.list_runs()}
        assert mine and not mine & {r['run_id'] for r in other.list_runs()}
    model.release()


def test_remote_data_components(connected):
    dataset = Dataset(dataset_meta=DatasetMeta('builtin://self-cognition', data_slice=range(12)))
    dataset.set_template('Template', model_id=MODEL)
    dataset.map(component('preprocessor', 'SelfCognitionProcessor', 'twinkle LLM', 'ModelScope community'))
    dataset.encode()
    assert len(dataset) == 12
    row = dataset[0]
    assert len(row['input_ids']) == len(row['labels'])
    loader = DataLoader(dataset=dataset, batch_size=4, min_batch_size=4)
    assert len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3 and all(len(b) == 4 for b in batches)
    model = RemoteModel(model_id=MODEL)
    model.add_adapter_to_model('default', LoraConfig(**LORA))
    model.set_optimizer('AdamW', lr=1e-3)
    assert model.forward_backward(inputs=batches[0])['loss'] > 0
    with pytest.raises(RemoteError, match='hub datasets only'):
        Dataset(dataset_meta=DatasetMeta('/etc/passwd'))
    model.release()


def test_handles_free_what_they_keep_on_the_model(server, connected):
    from twinkle.server import native_ops
    from twinkle.server.native_objects import TRANSIENT_PER_TENANT

    def held() -> int:
        return server.ctx.engine.host.call(native_ops.held)

    model = RemoteModel(model_id=MODEL)
    model.add_adapter_to_model('default', LoraConfig(**LORA))
    before = held()
    loss = model.calculate_loss(model.forward(inputs=samples(1)))
    assert held() == before + 2                        # the outputs and the loss, with their graph
    model.backward(loss)                               # backward spends both
    assert held() == before
    dropped = model.forward(inputs=samples(1))
    connected.release(dropped._object_id)
    model.forward_only(inputs=samples(1))              # the next call frees what the dropped handle kept
    assert held() == before
    for _ in range(TRANSIENT_PER_TENANT + 4):          # more handles than the object table keeps
        model.forward(inputs=samples(1))
    model.forward_only(inputs=samples(1))
    assert before < held() <= before + TRANSIENT_PER_TENANT
    model.release()                                    # its adapter goes, and all it kept
    assert held() == before
