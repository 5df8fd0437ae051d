"""TorchSampler: logprobs agree with the trainer, sampling parameters, stops, batching, caches, adapters."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from twinkle.loss.utils import token_logprobs
from twinkle.registry import resolve
from twinkle.sampler import SamplingParams, TorchSampler, to_train_samples
from twinkle.types import IGNORE_INDEX

from .conftest import MODEL_ID, PROMPTS


def _flat(results):
    return [s for r in results for s in r.sequences]


def _forward_logps(module, prompt, completion, temperature=1.0):
    ids = torch.tensor([prompt + completion])
    labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + completion])
    with torch.no_grad():
        logits = module(input_ids=ids).logits
    return token_logprobs(logits, labels, temperature=temperature)[0][0, len(prompt):]


def test_logprobs_equal_the_trainers_at_temperature_one(sampler):
    from twinkle.model import TransformersModel
    trainer = TransformersModel(model_id=MODEL_ID, mixed_precision='no')
    results = sampler.sample(PROMPTS, SamplingParams(max_tokens=6, n=2, seed=0))
    samples = to_train_samples(results, advantages=[0.0] * 4)
    out = trainer.forward_only(inputs=samples)
    for i, sample in enumerate(samples):
        n = len(sample['input_ids'])
        old = torch.tensor(sample['old_logps'])
        torch.testing.assert_close(out['logps'][i, :n].float(), old, rtol=0, atol=1e-4)
        assert (old[len(results[i // 2].prompt_token_ids):] < 0).all()


@pytest.mark.parametrize('temperature', [0.5, 1.7])
def test_logprobs_are_of_the_temperature_scaled_distribution(sampler, temperature):
    result = sampler.sample(PROMPTS[:1], max_tokens=5, temperature=temperature, top_k=20, seed=1)[0]
    seq = result.sequences[0]
    expected = _forward_logps(sampler.hf_model, result.prompt_token_ids, seq.token_ids, temperature)
    torch.testing.assert_close(torch.tensor(seq.logprobs), expected, rtol=0, atol=1e-4)


def test_greedy_is_argmax_and_seed_free(sampler):
    a = sampler.sample(PROMPTS, temperature=0, max_tokens=5, seed=1)
    b = sampler.sample(PROMPTS, temperature=0, max_tokens=5, seed=2)
    assert [s.token_ids for s in _flat(a)] == [s.token_ids for s in _flat(b)]
    prompt = list(a[0].prompt_token_ids)
    ids = list(prompt)
    for _ in range(len(a[0].sequences[0].token_ids)):
        with torch.no_grad():
            ids.append(int(sampler.hf_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert a[0].sequences[0].token_ids == ids[len(prompt):len(prompt) + len(a[0].sequences[0].token_ids)]


def test_seed_reproduces_and_leaves_global_rng_alone(sampler):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = sampler.sample(PROMPTS, max_tokens=4, n=3, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    b = sampler.sample(PROMPTS, max_tokens=4, n=3, seed=7)
    c = sampler.sample(PROMPTS, max_tokens=4, n=3, seed=8)
    assert [s.token_ids for s in _flat(a)] == [s.token_ids for s in _flat(b)]
    assert [s.token_ids for s in _flat(a)] != [s.token_ids for s in _flat(c)]
    assert len(a) == 2 and all(len(r.sequences) == 3 for r in a)


def test_left_padded_batches_match_single_prompts(sampler):
    together = sampler.sample(PROMPTS, temperature=0, max_tokens=6)
    alone = [sampler.sample([p], temperature=0, max_tokens=6)[0] for p in PROMPTS]
    assert [s.token_ids for s in _flat(together)] == [s.token_ids for s in _flat(alone)]
    small = TorchSampler(model=sampler.hf_model, template=sampler.template, max_batch_size=1)
    assert [s.token_ids for s in _flat(small.sample(PROMPTS, temperature=0, max_tokens=6))] == \
        [s.token_ids for s in _flat(together)]


def test_prompt_forms_give_the_same_tokens(sampler):
    ids = sampler.template.encode({'messages': PROMPTS[0]}, add_generation_prompt=True)['input_ids']
    forms = [PROMPTS[0], {'messages': PROMPTS[0]}, [PROMPTS[0]], ids, [ids], {'input_ids': ids},
             torch.tensor(ids)]
    outs = [sampler.sample(f, temperature=0, max_tokens=3)[0] for f in forms]
    assert all(o.prompt_token_ids == ids for o in outs)
    assert len({tuple(o.sequences[0].token_ids) for o in outs}) == 1


def test_stop_token_ids_and_length(sampler):
    free = sampler.sample(PROMPTS[:1], temperature=0, max_tokens=6)[0].sequences[0]
    assert free.stop_reason == 'length' and len(free.token_ids) == 6
    stop_tok = free.token_ids[2]
    cut = sampler.sample(PROMPTS[:1], temperature=0, max_tokens=6, stop_token_ids=[stop_tok])[0].sequences[0]
    first = free.token_ids.index(stop_tok)
    assert cut.stop_reason == 'stop' and cut.token_ids == free.token_ids[:first + 1]
    assert len(cut.logprobs) == len(cut.token_ids)
    assert cut.text == sampler.template.decode(free.token_ids[:first], skip_special_tokens=True)


def _clean_stop(decode, token_ids):
    """(k, stop char, text of the first k tokens): the first token that brings a printable character
    not seen before; None when the completion has none."""
    for k in range(2, len(token_ids)):
        before, after = decode(token_ids[:k - 1]), decode(token_ids[:k])
        fresh = [c for c in after[len(before):] if c.isprintable() and not c.isspace() and c != '\ufffd'
                 and c not in before]
        if after.startswith(before) and fresh:
            return k, fresh[0], after
    return None


def test_stop_strings_cut_text_and_tokens(sampler):
    decode = lambda ids: sampler.template.decode(ids, skip_special_tokens=True)  # noqa: E731
    for seed in range(10):
        free = sampler.sample(PROMPTS[:1], max_tokens=12, seed=seed)[0].sequences[0]
        found = _clean_stop(decode, free.token_ids)
        if found:
            break
    assert found, 'no sampled completion had a clean character to stop on'
    k, stop, text = found
    cut = sampler.sample(PROMPTS[:1], max_tokens=12, seed=seed, stop=[stop])[0].sequences[0]
    assert cut.stop_reason == 'stop'
    assert cut.token_ids == free.token_ids[:k]
    assert cut.text == text[:text.find(stop)]


def test_finish_sequence_with_known_text(sampler):
    from twinkle.sampler.base import finish_sequence
    decode = lambda ids: sampler.template.decode(ids, skip_special_tokens=True)  # noqa: E731
    ids = sampler.template.tokenizer.encode('the answer is 42. Done', add_special_tokens=False)
    params = SamplingParams(max_tokens=len(ids) + 5, stop=['.'])
    seq = finish_sequence(ids + [0, 0], [-1.0] * (len(ids) + 2), params, [2], decode)
    assert seq.text == 'the answer is 42' and seq.stop_reason == 'stop'
    assert decode(seq.token_ids).endswith('.') and not decode(seq.token_ids[:-1]).endswith('.')
    assert len(seq.logprobs) == len(seq.token_ids)
    eos = finish_sequence(ids[:3] + [2, 0], [-1.0] * 5, SamplingParams(max_tokens=5), [2], decode)
    assert eos.token_ids == ids[:3] + [2] and eos.stop_reason == 'stop' and eos.text == decode(ids[:3])
    full = finish_sequence(ids[:4], [-1.0] * 4, SamplingParams(max_tokens=4), [2], decode)
    assert full.stop_reason == 'length' and full.token_ids == ids[:4]


def test_generation_config_is_honoured(sampler):
    from transformers import GenerationConfig
    out = sampler.sample(PROMPTS[:1], GenerationConfig(max_new_tokens=3, do_sample=False))[0]
    greedy = sampler.sample(PROMPTS[:1], temperature=0, max_tokens=3)[0]
    assert out.sequences[0].token_ids == greedy.sequences[0].token_ids
    params = SamplingParams.from_any(GenerationConfig(max_new_tokens=9, do_sample=True, temperature=0.3, top_k=5,
                                                      top_p=0.9, num_return_sequences=4, stop_strings=['x'],
                                                      eos_token_id=[2, 7]))
    assert (params.max_tokens, params.temperature, params.top_k, params.top_p, params.n) == (9, 0.3, 5, 0.9, 4)
    assert params.stop == ['x'] and params.stop_token_ids == [2, 7]


@pytest.mark.parametrize('impl', ['dynamic', 'static'])
def test_cache_implementations_give_the_same_greedy_tokens(sampler, impl):
    reference = sampler.sample(PROMPTS, temperature=0, max_tokens=5)
    out = sampler.sample(PROMPTS, temperature=0, max_tokens=5, cache_implementation=impl)
    assert [s.token_ids for s in _flat(out)] == [s.token_ids for s in _flat(reference)]
    for a, b in zip(_flat(out), _flat(reference)):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-4)


def test_sliding_window_cache_on_a_sliding_window_model(sampler):
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(sampler.model_dir)
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, 6, 0
    config.layer_types = ['sliding_attention'] * config.num_hidden_layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    windowed = TorchSampler(model=model, template=sampler.template, cache_implementation='sliding_window')
    dynamic = TorchSampler(model=model, template=sampler.template)
    a = windowed.sample(PROMPTS, temperature=0, max_tokens=6)
    b = dynamic.sample(PROMPTS, temperature=0, max_tokens=6)
    assert [s.token_ids for s in _flat(a)] == [s.token_ids for s in _flat(b)]
    with pytest.raises(ValueError, match='sliding window'):
        sampler.sample(PROMPTS, max_tokens=2, cache_implementation='sliding_window')


def test_caches_this_machine_cannot_run_fail_clearly(sampler):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda'"):
            sampler.sample(PROMPTS, max_tokens=2, cache_implementation='offloaded')
    import transformers.utils as tu
    if not tu.is_optimum_quanto_available():
        with pytest.raises(ImportError, match='optimum-quanto'):
            sampler.sample(PROMPTS, max_tokens=2, cache_implementation='quantized')
    with pytest.raises(ValueError, match='not supported'):
        sampler.sample(PROMPTS, max_tokens=2, cache_implementation='paged-ish')


def test_named_adapters_are_served_side_by_side(sampler):
    own = TorchSampler(model=sampler.hf_model, template=sampler.template)
    torch.manual_seed(0)
    own.add_adapter('first', LoraConfig(r=4, target_modules='all-linear', init_lora_weights=False))
    torch.manual_seed(1)
    own.add_adapter('second', {'r': 4, 'target_modules': ['q_proj', 'v_proj'], 'init_lora_weights': False})
    assert own.adapter_names == ['first', 'second']
    seq = sampler.sample(PROMPTS[:1], temperature=0, max_tokens=4)[0]
    ids = [seq.prompt_token_ids + seq.sequences[0].token_ids]
    base = own.compute_logprobs(ids)[0]
    la, lb = own.compute_logprobs(ids, adapter_name='first')[0], own.compute_logprobs(ids, adapter_name='second')[0]
    torch.testing.assert_close(torch.tensor(base), torch.tensor(sampler.compute_logprobs(ids)[0]))
    assert max(abs(x - y) for x, y in zip(base, la)) > 1e-3 and max(abs(x - y) for x, y in zip(la, lb)) > 1e-3
    # Scoring with an adapter equals what that adapter's forward gives.
    own.module.set_adapter('first')
    expected = _forward_logps(own.module, ids[0][:1], ids[0][1:])
    torch.testing.assert_close(torch.tensor(la[1:]), expected, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="no adapter 'c'"):
        own.sample(PROMPTS, max_tokens=2, adapter_name='c')
    with pytest.raises(ValueError, match='no adapter'):
        sampler.sample(PROMPTS, max_tokens=2, adapter_name='first')
    own.remove_adapter('second')
    assert own.adapter_names == ['first']


def test_compute_logprobs_positions(sampler):
    rows = [[1, 5, 9, 13], [1, 7]]
    out = sampler.compute_logprobs(rows)
    assert [len(r) for r in out] == [4, 2] and out[0][0] == 0.0 and out[1][0] == 0.0
    alone = sampler.compute_logprobs(rows[1:])
    torch.testing.assert_close(torch.tensor(out[1]), torch.tensor(alone[0]), rtol=0, atol=1e-5)


def test_registered_as_sampler():
    assert resolve('sampler', 'TorchSampler') is TorchSampler
    from twinkle.runtime.remote import is_remote_class, remote_methods
    assert is_remote_class(TorchSampler)
    assert remote_methods(TorchSampler)['sample'].dispatch == 'slice'
    assert remote_methods(TorchSampler)['load_weights'].dispatch == 'all'


@pytest.mark.parametrize('kwargs, match', [
    ({'n': 0}, 'n=0'), ({'temperature': -0.1}, 'temperature'), ({'top_p': 0.0}, 'top_p'),
    ({'top_p': 1.5}, 'top_p'), ({'max_tokens': 0}, 'max_tokens'), ({'top_k': -3}, 'top_k'),
    ({'stop': ['']}, 'stop'), ({'temprature': 1.0}, 'unknown sampling parameter'),
])
def test_bad_sampling_params(sampler, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampler.sample(PROMPTS, **kwargs)


@pytest.mark.parametrize('inputs, error, match', [
    ([], ValueError, 'no prompts'), ([[]], ValueError, 'prompt 0 is empty'),
    ([{'input_ids': []}], ValueError, 'prompt 0 is empty'), ('3+4=', TypeError, 'plain string'),
    ([{'messages': []}], ValueError, 'empty messages'), ([3.5], TypeError, 'prompt 0'),
    ([{'text': 'hi'}], TypeError, 'prompt 0'),
])
def test_bad_prompts(sampler, inputs, error, match):
    with pytest.raises(error, match=match):
        sampler.sample(inputs, max_tokens=2)


def test_bad_construction_and_weights(sampler):
    with pytest.raises(ValueError, match='exactly one'):
        TorchSampler()
    with pytest.raises(TypeError, match='twinkle model or a Hugging Face module'):
        TorchSampler(model=object())
    with pytest.raises(ValueError, match='no base weight named nope.weight'):
        sampler.load_weights({'nope.weight': torch.zeros(1)})
    name = 'model.norm.weight'
    with pytest.raises(ValueError, match='shape'):
        sampler.load_weights({name: torch.zeros(3)})
    with pytest.raises(ValueError, match="no adapter 'x'"):
        sampler.load_weights({}, adapter_name='x')
