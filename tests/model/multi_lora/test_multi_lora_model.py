"""Batched multi-LoRA on the embedded model against PEFT's own LoRA, one adapter at a time."""
from __future__ import annotations

import pytest
import torch

from twinkle.model.multi_lora import (
    adapter_config,
    adapter_names,
    adapter_parameters,
    adapter_state_dict,
    add_adapter,
    inject,
    load_adapter,
    multi_lora_layers,
    route,
    save_adapter,
)

from . import helpers

R4, R8, R16, IDLE = 'ten4', 'ten8', 'ten16', 'idle'


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    # 1e-6 relative to the tensor's own scale: gradients of a summed loss reach ~1e2, where fp32 resolves ~1e-5.
    tol = 1e-6 * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol, msg=lambda m: f'{what}: {m}')


@pytest.fixture(scope='module')
def peft():
    return helpers.peft_model()


def run_batched(model, names, ids, weight):
    model.zero_grad(set_to_none=True)
    with route(model, names):
        logits = model(input_ids=ids).logits
    (logits * weight).sum().backward()
    return logits.detach()


def check_against_peft(peft, ours, names, ids, weight, logits):
    for name in dict.fromkeys(n for n in names if n is not None):
        rows = helpers.rows_of(names, name)
        ref_logits, ref_grads = helpers.peft_reference(peft, name, ids[rows], weight[rows])
        assert_close(logits[rows], ref_logits, f'logits of {name}')
        grads = helpers.ours_grads(ours, name)
        assert set(grads) == set(ref_grads) and len(grads) == 28    # 4 layers x 7 linear layers
        for path, (ga, gb) in grads.items():
            assert_close(ga, ref_grads[path][0], f'{path} lora_A grad of {name}')
            assert_close(gb, ref_grads[path][1], f'{path} lora_B grad of {name}')


@pytest.mark.parametrize('names', [
    [R4, R16, R8, R4, R8, R16, R8, R4],            # interleaved, uneven rows per adapter
    [R4, R4, R8, R8, R16, R16],                    # grouped and equal: the no-copy layout
    [R16, R4, R8, R4, R8, R16],                    # equal but interleaved: a permutation, no padding
    [R8, R8, R8],                                  # rows of one adapter only
])
def test_values_and_grads_match_each_adapter_alone_in_peft(peft, names):
    ours = helpers.batched_from(peft)
    ours.train()
    ids, weight = helpers.batch(len(names))
    logits = run_batched(ours, names, ids, weight)
    check_against_peft(peft, ours, names, ids, weight, logits)


def test_adapter_without_rows_gets_no_grad_and_base_rows_get_base_output(peft):
    ours = helpers.batched_from(peft)
    names = [R4, None, R16, R4]
    ids, weight = helpers.batch(len(names))
    logits = run_batched(ours, names, ids, weight)
    for name in (IDLE, R8):
        assert all(p.grad is None for p in adapter_parameters(ours, name)), name
    with peft.disable_adapter():
        base = peft(input_ids=ids[[1]]).logits.detach()
    assert_close(logits[[1]], base, 'base-only row')
    check_against_peft(peft, ours, names, ids, weight, logits)


def test_dropout_draws_from_each_adapters_own_generator():
    peft = helpers.peft_model(dropout=0.2)
    ours = helpers.batched_from(peft)
    ours.train()
    specs = {n: multi_lora_layers(ours)['model.layers.0.mlp.down_proj'].specs[n] for n in adapter_names(ours)}

    def run(names):
        for spec in specs.values():
            spec.reseed()
        ids_all, weight_all = helpers.batch(len(names), seed=5)
        # Rows of R8 carry the same tokens whatever the batch holds.
        ids_all[[i for i, n in enumerate(names) if n == R8]] = ids_r8
        weight_all[[i for i, n in enumerate(names) if n == R8]] = weight_r8
        logits = run_batched(ours, names, ids_all, weight_all)
        rows = helpers.rows_of(names, R8)
        grads = [p.grad.clone() for p in adapter_parameters(ours, R8)]
        return logits[rows], grads

    ids_r8, weight_r8 = helpers.batch(2, seed=9)
    alone, grads_alone = run([R8, R8])
    shared, grads_shared = run([R4, R8, R16, R16, R8, R4])
    assert_close(shared, alone, 'R8 rows with other adapters in the batch')
    for g_shared, g_alone in zip(grads_shared, grads_alone):
        assert_close(g_shared, g_alone, 'R8 grads with other adapters in the batch')
    again, _ = run([R8, R8])
    assert torch.equal(again, alone)                     # reseeded: the same masks
    ours.eval()
    with route(ours, [R8, R8]):
        no_dropout = ours(input_ids=ids_r8).logits.detach()
    assert (no_dropout - alone).abs().max() > 1e-3       # dropout did act in training mode


def test_saved_adapter_loads_in_peft_with_same_outputs(tmp_path, peft):
    from peft import PeftModel

    ours = helpers.batched_from(peft)
    ours.eval()
    ids, _ = helpers.batch(3)
    for name in (R8, R4):                                # R8 uses rslora
        directory = save_adapter(ours, name, str(tmp_path / name))
        loaded = PeftModel.from_pretrained(helpers.base_model(), directory).eval()
        with route(ours, [name] * 3):
            expected = ours(input_ids=ids).logits.detach()
        assert_close(loaded(input_ids=ids).logits.detach(), expected, f'PEFT-loaded {name}')


def test_state_dict_matches_peft_and_peft_folder_loads_here(tmp_path, peft):
    from peft import get_peft_model_state_dict

    ours = helpers.batched_from(peft)
    ours_sd = adapter_state_dict(ours, R16)
    peft_sd = get_peft_model_state_dict(peft, adapter_name=R16)
    assert set(ours_sd) == set(peft_sd)
    for key, value in peft_sd.items():
        assert torch.equal(ours_sd[key], value), key

    peft.save_pretrained(str(tmp_path), selected_adapters=[R16])
    fresh = helpers.base_model()
    inject(fresh, 'all-linear')
    load_adapter(fresh, 'tenant', str(tmp_path / R16))
    ids, weight = helpers.batch(2)
    fresh.train()
    logits = run_batched(fresh, ['tenant', 'tenant'], ids, weight)
    ref_logits, ref_grads = helpers.peft_reference(peft, R16, ids, weight)
    assert_close(logits, ref_logits, 'logits of the loaded adapter')
    for path, (ga, gb) in helpers.ours_grads(fresh, 'tenant').items():
        assert_close(ga, ref_grads[path][0], path)
        assert_close(gb, ref_grads[path][1], path)


def test_inject_plain_model_all_linear_and_new_adapter_starts_as_base():
    model = helpers.base_model().eval()
    ids, _ = helpers.batch(2)
    base = model(input_ids=ids).logits.detach()
    paths = inject(model, 'all-linear')
    assert len(paths) == 28 and not any('lm_head' in p for p in paths)
    assert all(not p.requires_grad for n, p in model.named_parameters() if 'lora_' not in n)
    add_adapter(model, 'fresh', r=8, lora_alpha=16)
    add_adapter(model, 'attn_only', r=4, lora_alpha=4, target_modules=['q_proj', 'v_proj'])
    assert len(adapter_parameters(model, 'attn_only')) == 2 * 2 * 4
    assert adapter_config(model, 'attn_only')['target_modules'] == ['q_proj', 'v_proj']
    add_adapter(model, 'one_layer', r=2, lora_alpha=2, target_modules=['model.layers.0.self_attn.q_proj'])
    # A leaf name would also cover the other layers' q_proj in PEFT: the full path is exported instead.
    assert adapter_config(model, 'one_layer')['target_modules'] == ['model.layers.0.self_attn.q_proj']
    with route(model, ['fresh', 'attn_only']):
        out = model(input_ids=ids).logits.detach()
    assert torch.equal(out, base)                        # B starts at zero


def test_routing_errors_name_the_problem(peft):
    ours = helpers.batched_from(peft)
    ids, _ = helpers.batch(2)
    with pytest.raises(ValueError, match='unknown adapter'):
        with route(ours, [R4, 'nobody']):
            pass
    with pytest.raises(ValueError, match='2 rows but the input batch has 3'):
        with route(ours, [R4, R8]):
            ours(input_ids=torch.cat([ids, ids[:1]]))
    with pytest.raises(TypeError, match='one adapter name'):
        with route(ours, R4):
            pass
    with pytest.raises(ValueError, match='already exists'):
        add_adapter(ours, R4)


@pytest.mark.parametrize('dropout', [0.0, 0.2])
def test_activation_checkpointing_with_backward_inside_the_routing_block(dropout):
    peft = helpers.peft_model(dropout=dropout)
    names = [R4, R16, R8, R4]
    ids, weight = helpers.batch(len(names))
    plain = helpers.batched_from(peft).train()
    logits = run_batched(plain, names, ids, weight)
    ckpt = helpers.batched_from(peft).train()        # a copy: its dropout generators start where plain's did
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
    with route(ckpt, names):                             # the recompute in backward needs the routing too
        out = ckpt(input_ids=ids).logits
        (out * weight).sum().backward()
    assert_close(out.detach(), logits, 'checkpointed logits')
    for name in (R4, R8, R16):
        ref = helpers.ours_grads(plain, name)
        for path, (ga, gb) in helpers.ours_grads(ckpt, name).items():
            assert_close(ga, ref[path][0], f'{path} lora_A grad of {name}')
            assert_close(gb, ref[path][1], f'{path} lora_B grad of {name}')


def test_adapter_with_per_layer_ranks_round_trips_through_peft(tmp_path):
    from peft import PeftModel

    peft = helpers.peft_model({'mixed': dict(r=8, lora_alpha=16, rank_pattern={'q_proj': 2, 'down_proj': 12})})
    ours = helpers.batched_from(peft).eval()
    ranks = {p.rpartition('.')[2]: layer.rank('mixed') for p, layer in multi_lora_layers(ours).items()}
    assert ranks['q_proj'] == 2 and ranks['down_proj'] == 12 and ranks['v_proj'] == 8
    directory = save_adapter(ours, 'mixed', str(tmp_path / 'mixed'))
    loaded = PeftModel.from_pretrained(helpers.base_model(), directory).eval()
    ids, _ = helpers.batch(2)
    with route(ours, ['mixed', 'mixed']):
        expected = ours(input_ids=ids).logits.detach()
    assert_close(loaded(input_ids=ids).logits.detach(), expected, 'PEFT-loaded per-layer ranks')


def test_dropout_rng_state_restores_the_same_masks():
    ours = helpers.batched_from(helpers.peft_model({R8: helpers.ADAPTERS[R8]}, dropout=0.3)).train()
    spec = multi_lora_layers(ours)['model.layers.0.mlp.down_proj'].specs[R8]
    ids, _ = helpers.batch(2)
    with route(ours, [R8, R8]):
        ours(input_ids=ids)                              # advance the generator
        state = spec.rng_state()
        first = ours(input_ids=ids).logits.detach()
        spec.set_rng_state(state)
        again = ours(input_ids=ids).logits.detach()
    assert torch.equal(first, again)
