"""The generation core: requests batched in one decode loop get what they get alone (multi-LoRA rows with their
own adapters, greedy and seeded sampling, different lengths and stops); stop strings looked for incrementally."""
from __future__ import annotations

import pytest
import torch

from twinkle.model import multi_lora
from twinkle.sampler.core import DecodeSpec, GenerationRequest, generate
from twinkle.sampler.stop_strings import StopStringWatcher

from .conftest import MODEL_ID


@pytest.fixture(scope='module')
def routed():
    """The embedded model with two batched multi-LoRA adapters of random (non-zero) weights, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twinkle.hub import resolve
    folder = resolve(MODEL_ID)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    multi_lora.inject(model, ['q_proj', 'v_proj', 'up_proj'])
    for i, name in enumerate(('a', 'b')):
        multi_lora.add_adapter(model, name, r=4, lora_alpha=16, seed=i)
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for param in multi_lora.adapter_parameters(model, name):
                param.normal_(0.0, 0.3)
    return model, AutoTokenizer.from_pretrained(folder)


def _run(model, requests, decode=None):
    return generate(model, requests, model.generation_config, pad_id=0, device='cpu', decode=decode)


def _requests(stop_strings=()):
    return [
        GenerationRequest([[11, 12, 13]] * 2, DecodeSpec(max_tokens=8, greedy=True), adapter='a'),
        GenerationRequest([[200, 31, 7, 99, 1000, 5, 42]] * 3, DecodeSpec(max_tokens=12, temperature=1.0, top_k=40),
                          torch.Generator().manual_seed(3), adapter='b'),
        GenerationRequest([[3000, 17, 250]], DecodeSpec(max_tokens=6, temperature=0.7, top_p=0.9,
                                                        stop_strings=stop_strings),
                          torch.Generator().manual_seed(4), adapter=None),
    ]


def test_batched_requests_equal_each_alone_with_per_row_adapters(routed):
    model, _ = routed
    alone = [_run(model, [req])[0] for req in _requests()]
    together = _run(model, _requests())
    assert [[s.token_ids for s in r] for r in together] == [[s.token_ids for s in r] for r in alone]
    for x, y in zip(alone, together):
        for s, t in zip(x, y):
            torch.testing.assert_close(torch.tensor(t.logprobs), torch.tensor(s.logprobs), rtol=0, atol=1e-5)
    # the adapters change the answer: the same greedy prompt under 'b' or the base model differs from 'a'
    other = [_run(model, [GenerationRequest([[11, 12, 13]], DecodeSpec(max_tokens=8, greedy=True), adapter=x)])[0]
             for x in ('b', None)]
    assert len({tuple(together[0][0].token_ids)} | {tuple(o[0].token_ids) for o in other}) == 3
    assert [len(s.token_ids) for s in together[1]] == [12, 12, 12] and together[1][0].stop_reason == 'length'


def test_logprobs_are_those_of_a_full_forward(routed):
    model, _ = routed
    seq = _run(model, _requests()[1:2])[0][0]
    ids = torch.tensor([[200, 31, 7, 99, 1000, 5, 42] + seq.token_ids])
    with torch.no_grad(), multi_lora.route(model, ['b']):
        logits = model(input_ids=ids).logits[0, 6:-1]
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(seq.token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(seq.logprobs), want, rtol=0, atol=1e-4)


def test_stop_strings_are_checked_on_the_tail_only(routed):
    model, tok = routed
    lengths = []

    def decode(ids):
        lengths.append(len(ids))
        return tok.decode(ids, skip_special_tokens=True)

    free = _run(model, _requests()[2:], decode)[0][0]
    text = tok.decode(free.token_ids, skip_special_tokens=True)
    stop = next((c for c in text[1:] if c.isalnum()), None)
    assert stop is not None, 'the completion has no character to stop on'
    lengths.clear()
    cut = _run(model, _requests(stop_strings=(stop,))[2:], decode)[0][0]
    watcher = StopStringWatcher([stop], decode)
    assert cut.stop_reason == 'stop' and stop not in cut.text
    assert cut.token_ids == free.token_ids[:len(cut.token_ids)]
    assert stop in tok.decode(cut.token_ids, skip_special_tokens=True)
    assert stop not in tok.decode(cut.token_ids[:-1], skip_special_tokens=True)
    # every check during decoding looked at a bounded tail, whatever the completion's length
    assert max(lengths[:-1]) <= watcher.window


def test_bad_requests_are_named():
    with pytest.raises(ValueError, match='max_tokens'):
        DecodeSpec(max_tokens=0)
    with pytest.raises(ValueError, match='temperature'):
        DecodeSpec(max_tokens=3, temperature=0.0)
    with pytest.raises(ValueError, match='at least one row'):
        GenerationRequest([], DecodeSpec(max_tokens=3))
    with pytest.raises(ValueError, match='non-empty strings'):
        StopStringWatcher([''], lambda ids: '')


def test_peft_row_routing_applies_to_this_threads_forwards_only():
    """A paused decode loop leaves the model to other jobs (the server's time slicing): their forwards, on other
    threads, must see the model as they set it, not the paused batch's routing."""
    import threading

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from twinkle.hub import resolve
    from twinkle.sampler.core import _peft_rows
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve(MODEL_ID), dtype=torch.float32)
    config = dict(r=4, target_modules=['q_proj', 'v_proj'], init_lora_weights=False)
    model = get_peft_model(base, LoraConfig(**config), adapter_name='a')
    model.add_adapter('b', LoraConfig(**config))
    model.eval()
    ids = torch.tensor([[11, 12, 13], [14, 15, 16]])
    with torch.no_grad():
        model.set_adapter('a')
        other_want = model(input_ids=ids[:1]).logits
        model.set_adapter('b')
        want_b = model(input_ids=ids[:1]).logits
        with model.disable_adapter():
            want_base = model(input_ids=ids[1:]).logits
        model.set_adapter('a')
        out = {}
        with _peft_rows(model, ['b', '__base__']):
            mixed = model(input_ids=ids).logits
            thread = threading.Thread(target=lambda: out.update(logits=model(input_ids=ids[:1]).logits))
            thread.start()
            thread.join()
    torch.testing.assert_close(out['logits'], other_want)
    torch.testing.assert_close(mixed[0], want_b[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], want_base[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want_b, other_want)
