"""The base model is shared by every tenant: nothing a tenant can do may change its weights, and every LoRA
rank / alpha a tenant sets is bounded."""
from __future__ import annotations

import hashlib

import pytest
import torch

from twinkle.client import RemoteError, TransformersModel as RemoteModel, TwinkleClient
from twinkle.client.codec import LoraConfig

from .conftest import KEY_A, MODEL, wait_future

tinker = pytest.importorskip('tinker')
from .test_tinker_protocol import loss_of, new_model, post_fb, post_optim  # noqa: E402

SAMPLES = [{'input_ids': list(range(10, 22)), 'labels': [-100] * 3 + list(range(13, 22))},
           {'input_ids': list(range(40, 49)), 'labels': [-100] * 2 + list(range(42, 49))}]
# Initialisations PEFT offers that read or rewrite the base weights (or need a data pass).
UNSAFE_INITS = ['pissa', 'pissa_niter_2', 'olora', 'loftq', 'corda', 'eva', 'mica', 'orthogonal', 'lora_ga']


def base_digest(server) -> str:
    """A hash of every base weight (adapter weights excluded; PEFT's wrapping does not change the names)."""
    model = server.ctx.engine.model.hf_model
    h = hashlib.sha256()
    for name, value in sorted((n.replace('.base_layer', ''), p) for n, p in model.state_dict().items()
                              if 'lora_' not in n):
        h.update(name.encode())
        h.update(value.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def client(server):
    with TwinkleClient(server.url, KEY_A) as c:
        yield c


def test_no_tenant_operation_changes_the_base_weights(server, client):
    before = base_digest(server)

    def unchanged(after: str) -> None:
        assert base_digest(server) == before, f'the base weights changed after {after}'

    model = RemoteModel(model_id=MODEL, client=client)
    # Adapters of every accepted kind, trained, sampled, saved, loaded and removed.
    configs = {'default': LoraConfig(r=4, target_modules='all-linear'),
               'noinit': LoraConfig(r=4, target_modules=['q_proj'], extra={'init_lora_weights': False}),
               'gauss': LoraConfig(r=4, target_modules=['q_proj', 'down_proj'], extra={'init_lora_weights': 'gaussian',
                                                                                     'use_rslora': True}),
               'pattern': LoraConfig(r=4, target_modules=['q_proj', 'v_proj'],
                                     extra={'rank_pattern': {'v_proj': 8}, 'alpha_pattern': {'v_proj': 16},
                                            'layers_to_transform': [0]})}
    for name, config in configs.items():
        model.add_adapter_to_model(name, config)
        unchanged(f'creating adapter {name}')
        model.set_optimizer('AdamW', lr=1e-2, adapter_name=name)
        model.forward_backward(inputs=SAMPLES, adapter_name=name)
        model.clip_grad_and_step(adapter_name=name)
        unchanged(f'training adapter {name}')
        model.generate([[5, 6, 7]], max_new_tokens=3, adapter_name=name)
        unchanged(f'generating with adapter {name}')
    path = model.save('integrity', adapter_name='pattern')
    model.load(path, adapter_name='pattern')
    model.add_adapter_to_model('copy', path)
    unchanged('save / load / an adapter from a checkpoint')
    model.remove_adapter('copy')
    unchanged('remove_adapter')
    # Refused ones (unsafe initialisations) must not have touched anything either.
    for init in UNSAFE_INITS:
        with pytest.raises(RemoteError, match='init_lora_weights') as err:
            model.add_adapter_to_model(f'bad{len(init)}', LoraConfig(r=4, target_modules=['q_proj', 'up_proj'],
                                                                     extra={'init_lora_weights': init}))
        assert err.value.status == 400
        unchanged(f'refusing init_lora_weights={init!r}')
    model.release()
    unchanged('release')
    # The Tinker API: create, train, save, sample, load, finish.
    with server.client(KEY_A) as c:
        mid = new_model(c)
        unchanged('create_model')
        loss_of(c, post_fb(c, mid, 1))
        wait_future(c, post_optim(c, mid, 2))
        unchanged('forward_backward and optim_step')
        save = c.post('/api/v1/save_weights', json={'model_id': mid, 'path': 'integrity', 'seq_id': 3}).json()
        tinker_path = wait_future(c, save['request_id']).json()['path']
        snap = c.post('/api/v1/save_weights_for_sampler', json={'model_id': mid, 'path': 'integrity-s', 'seq_id': 4})
        sampler_path = wait_future(c, snap.json()['request_id']).json()['path']
        for body in ({'model_path': sampler_path}, {'base_model': MODEL}):
            resp = c.post('/api/v1/asample', json={**body, 'prompt': {'chunks': [{'tokens': [5, 6, 7]}]},
                                                   'num_samples': 2, 'sampling_params': {'max_tokens': 3}})
            assert wait_future(c, resp.json()['request_id']).status_code == 200
        unchanged('save_weights, save_weights_for_sampler, asample')
        load = c.post('/api/v1/load_weights', json={'model_id': mid, 'path': tinker_path, 'optimizer': True,
                                                    'seq_id': 5})
        assert wait_future(c, load.json()['request_id']).json()['type'] == 'load_weights'
        assert loss_of(c, post_fb(c, mid, 6, forward_only=True)) > 0
        session = mid.split(':')[0]
        unchanged('load_weights')
        assert c.post(f'/api/v1/sessions/{session}/finish').status_code == 200
    unchanged('finishing the session')


def add_raw(server, lora: LoraConfig):
    """add_adapter_to_model over plain HTTP: the JSON may hold NaN / Infinity, as a hostile client sends it."""
    import json

    from twinkle.client import codec
    from twinkle.client.methods import API_PREFIX
    with server.client(KEY_A) as c:
        oid = c.post(f'{API_PREFIX}/objects', json={'class_name': 'TransformersModel',
                                                    'kwargs': {'model_id': MODEL}}).json()['object_id']
        body = json.dumps({'args': ['x', codec.encode(lora)]}).encode()
        resp = c.post(f'{API_PREFIX}/objects/{oid}/call/add_adapter_to_model', content=body,
                      headers={'Content-Type': 'application/json'})
        c.delete(f'{API_PREFIX}/objects/{oid}')
    return resp


@pytest.mark.parametrize('extra,field', [
    ({'rank_pattern': {'q_proj': 4096}}, 'rank_pattern'),
    ({'rank_pattern': {'q_proj': 0}}, 'rank_pattern'),
    ({'rank_pattern': {'q_proj': 4.5}}, 'rank_pattern'),
    ({'rank_pattern': {'(': 4}}, 'rank_pattern'),
    ({'rank_pattern': {f'p{i}': 4 for i in range(100)}}, 'rank_pattern'),
    ({'alpha_pattern': {'q_proj': 1e30}}, 'alpha_pattern'),
    ({'alpha_pattern': {'q_proj': -1}}, 'alpha_pattern'),
    ({'alpha_pattern': {'q_proj': float('nan')}}, 'alpha_pattern'),
    ({'alpha_pattern': {'q_proj': float('inf')}}, 'alpha_pattern'),
    ({'alpha_pattern': {'q_proj': True}}, 'alpha_pattern'),
    ({'use_rslora': 'yes'}, 'use_rslora'),
    ({'layers_to_transform': [10 ** 6]}, 'layers_to_transform'),
])
def test_every_rank_and_alpha_is_bounded(server, extra, field):
    resp = add_raw(server, LoraConfig(r=4, target_modules=['q_proj'], extra=extra))
    assert resp.status_code == 400 and field in resp.json()['detail'], resp.text


@pytest.mark.parametrize('alpha', [float('inf'), float('nan'), 1e30, 0, -2])
def test_lora_alpha_is_finite_positive_and_bounded(server, alpha):
    resp = add_raw(server, LoraConfig(r=4, lora_alpha=alpha, target_modules=['q_proj']))
    assert resp.status_code == 400 and 'lora_alpha' in resp.json()['detail'], resp.text


def test_ranks_within_the_limits_give_the_asked_shapes(server, client):
    model = RemoteModel(model_id=MODEL, client=client)
    with pytest.raises(RemoteError, match='max_lora_rank'):
        model.add_adapter_to_model('z', LoraConfig(r=4096, target_modules=['q_proj']))
    model.add_adapter_to_model('ok', LoraConfig(r=4, target_modules=['q_proj', 'v_proj'],
                                                extra={'rank_pattern': {'q_proj': 8}, 'alpha_pattern': {'q_proj': 64}}))
    shapes = {k: tuple(v.shape) for k, v in model.get_state_dict(adapter_name='ok').items()}
    assert shapes and all((8 in s) == ('q_proj' in k) for k, s in shapes.items())
    model.release()


def test_tinker_rank_is_bounded(server):
    with server.client(KEY_A) as c:
        session = c.post('/api/v1/create_session', json={}).json()['session_id']
        resp = c.post('/api/v1/create_model', json={'session_id': session, 'model_seq_id': 0, 'base_model': MODEL,
                                                    'lora_config': {'rank': 4096}})
        if resp.status_code == 200:
            resp = wait_future(c, resp.json()['request_id'])
            assert 'max_lora_rank' in resp.json()['error']
        else:
            assert resp.status_code == 400 and 'max_lora_rank' in resp.json()['detail']
    assert torch.__version__  # the server stayed up
