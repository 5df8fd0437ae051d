"""map / filter / encode / pack on ``Dataset``: counted drops, row provenance in errors, caching."""
from __future__ import annotations

import logging

import pytest

from twinkle.dataset import Dataset, DatasetMeta, RowError
from twinkle.preprocessor import AlpacaProcessor, LengthFilter, Preprocessor, SelfCognitionProcessor
from twinkle.registry import RegistryError
from twinkle.types import IGNORE_INDEX


class DropOdd(Preprocessor):
    def __call__(self, row):
        if int(row['output'].split()[-1]) % 2:
            return None
        return AlpacaProcessor()(row)


class Twice(Preprocessor):
    def __call__(self, row):
        t = AlpacaProcessor()(row)
        return [t, t]


def test_map_by_name_with_kwargs():
    ds = Dataset(DatasetMeta('builtin://self-cognition', data_slice=range(100)))
    ds.map('SelfCognitionProcessor', name='twinkle LLM', author='ModelScope community')
    assert len(ds) == 100
    texts = [m['content'] for r in ds for m in r['messages']]
    assert not any('{{' in t for t in texts)
    assert any('twinkle LLM' in t for t in texts) and any('ModelScope community' in t for t in texts)
    assert [m['role'] for m in ds[0]['messages']] == ['system', 'user', 'assistant']


def test_unknown_name_lists_close_matches():
    ds = Dataset(data=[{'query': 'q', 'response': 'r'}])
    with pytest.raises(RegistryError, match="Did you mean 'SelfCognitionProcessor'"):
        ds.map('SelfCognitionProcesor')
    with pytest.raises(RegistryError, match="'LengthFilter'"):
        ds.filter('LenghtFilter')


def test_preprocessor_drops_and_expansion_are_counted(alpaca_file, caplog):
    ds = Dataset(DatasetMeta(alpaca_file))
    with caplog.at_level(logging.INFO, logger='twinkle.dataset.dataset'):
        ds.map(DropOdd())
    assert len(ds) == 5 and ds.stats == {'preprocessor:DropOdd': 5}
    assert [r['__row__'] for r in ds.dataset] == [0, 2, 4, 6, 8]
    assert any('dropped 5 of 10 rows (preprocessor:DropOdd)' in r.message for r in caplog.records)
    ds2 = Dataset(DatasetMeta(alpaca_file)).map(Twice())
    assert len(ds2) == 20 and ds2.stats == {}


def test_filter_counts_and_logs(alpaca_file, caplog):
    ds = Dataset(DatasetMeta(alpaca_file)).map(AlpacaProcessor())
    ds.filter(LengthFilter(max_length=2 + len('answer 4')))  # every row is 'qN' + 'answer N': all kept
    assert len(ds) == 10 and ds.stats == {}
    with caplog.at_level(logging.INFO):
        ds.filter(lambda row: row['messages'][1]['content'] != 'answer 3')
    ds.filter('EmptyFilter')
    assert len(ds) == 9 and ds.stats == {'filter:<lambda>': 1}
    assert 'filter:<lambda>' in caplog.text


def test_callable_map_and_num_proc_2(alpaca_file):
    one = Dataset(DatasetMeta(alpaca_file)).map(AlpacaProcessor())
    two = Dataset(DatasetMeta(alpaca_file)).map(AlpacaProcessor(), num_proc=2).filter(
        lambda r: r['messages'][0]['content'] != 'q5', num_proc=2)
    assert list(one)[:5] + list(one)[6:] == list(two)
    assert two.stats == {'filter:<lambda>': 1}


def test_tools_and_extra_keys_round_trip():
    row = {'messages': [{'role': 'user', 'content': 'weather?'},
                        {'role': 'assistant', 'content': '', 'tool_calls': [{'name': 'w', 'arguments': {'c': 1}}]},
                        {'role': 'tool', 'content': 'sunny', 'name': 'w'},
                        {'role': 'assistant', 'content': 'Sunny.'}],
           'tools': [{'name': 'w', 'parameters': {'type': 'object'}}], 'solution': 42}
    ds = Dataset(data=[{'x': 0}, {'x': 1}]).map(lambda r: row if r['x'] else {'messages': row['messages'][:1]},
                                                batched=False)
    assert ds[1] == row
    assert ds[0] == {'messages': [{'role': 'user', 'content': 'weather?'}]}


@pytest.mark.parametrize('bad,field', [
    ({'instruction': 'x'}, "missing field 'output'"),
    ({'instruction': 'x', 'output': 7}, "field 'output' must be a string, got int"),
])
def test_bad_rows_name_source_row_and_field(tmp_path, jsonl, bad, field):
    path = jsonl(tmp_path / 'mine.jsonl', [{'instruction': 'a', 'output': 'b'}] * 3 + [bad])
    ds = Dataset(DatasetMeta(path, data_slice=range(1, 4)))
    with pytest.raises(RowError) as info:
        ds.map('AlpacaProcessor')
    msg = str(info.value)
    assert f'row 3 of {path}' in msg and 'AlpacaProcessor' in msg and field in msg
    assert isinstance(info.value, ValueError)


def test_bad_role_after_two_steps_names_original_row(tmp_path, jsonl):
    rows = [{'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]}] * 4
    rows.append({'messages': [{'role': 'robot', 'content': 'hi'}]})
    path = jsonl(tmp_path / 'chat.jsonl', rows)
    ds = Dataset(DatasetMeta(path)).filter(lambda r: True)
    with pytest.raises(RowError, match=rf"row 4 of {path} \(preprocessor MessagesProcessor\).*unknown role 'robot'"):
        ds.map('MessagesProcessor')


def test_bad_output_of_a_user_callable(alpaca_file):
    with pytest.raises(RowError, match=r"row 0 of .*must return \{'messages'"):
        Dataset(DatasetMeta(alpaca_file)).map(lambda r: {'text': 'x'}, batched=False)
    with pytest.raises(RowError, match=r"'messages'\[0\].role is 'bot'"):
        Dataset(DatasetMeta(alpaca_file)).map(lambda r: {'messages': [{'role': 'bot', 'content': 'x'}]},
                                              batched=False)


def test_encode_and_delete_truncation_counted(alpaca_file, char_template, encode_calls, caplog):
    ds = Dataset(DatasetMeta(alpaca_file)).map(AlpacaProcessor())
    ds.set_template(char_template(max_length=14, truncation_strategy='delete'))
    with caplog.at_level(logging.WARNING):
        ds.encode()
    # 'q0', end, 'answer 0', end: 12 tokens in every row, so none is deleted
    assert len(ds) == 10 and ds.stats == {}
    row = ds[0]
    assert row['input_ids'] == [ord(c) for c in 'q0'] + [1] + [ord(c) for c in 'answer 0'] + [1]
    assert row['labels'] == [IGNORE_INDEX] * 3 + [ord(c) for c in 'answer 0'] + [1]
    assert row['length'] == 12 and row['attention_mask'] == [1] * 12 and 'position_ids' not in row
    long = Dataset(data=[{'instruction': 'q', 'output': 'x' * n} for n in (5, 20, 6, 30)]).map('AlpacaProcessor')
    long.set_template(char_template(max_length=12, truncation_strategy='delete')).encode()
    assert [r['length'] for r in long] == [8, 9] and long.stats == {'truncation:delete': 2}
    assert 'truncation:delete' in caplog.text


def test_encode_error_names_row(char_template):
    ds = Dataset(data=[{'instruction': 'q', 'output': 'x' * n} for n in (1, 50)]).map('AlpacaProcessor')
    with pytest.raises(RowError, match=r'row 1 of <data> \(encode with CharTemplate\): encoded length 53 exceeds'):
        ds.set_template(char_template(max_length=20)).encode()


def test_encode_cache_hit(alpaca_file, char_template, encode_calls, isolated_cache):
    def build():
        return Dataset(DatasetMeta(alpaca_file)).map(AlpacaProcessor()).set_template(char_template(max_length=64))

    first = build().encode()
    assert len(encode_calls) == 10 and not first.last_encode_from_cache
    assert list((isolated_cache / 'datasets').glob('encode-*.arrow'))
    second = build().encode()
    assert len(encode_calls) == 10, 'the second encode() must read the cached Arrow file'
    assert second.last_encode_from_cache and list(second) == list(first)
    other = build().set_template(char_template(max_length=63)).encode()  # another template: not the cache
    assert len(encode_calls) == 20 and not other.last_encode_from_cache
    build().encode(cache=False)
    assert len(encode_calls) == 30


def test_encode_num_proc_2_cached(alpaca_file, char_template, encode_calls):
    a = Dataset(DatasetMeta(alpaca_file)).map(AlpacaProcessor()).set_template(char_template()).encode(num_proc=2)
    b = Dataset(DatasetMeta(alpaca_file)).map(AlpacaProcessor()).set_template(char_template()).encode(num_proc=2)
    assert b.last_encode_from_cache and list(a) == list(b) and len(a) == 10


def test_encode_needs_template_and_trajectories(char_template):
    ds = Dataset(data=[{'query': 'q'}])
    with pytest.raises(ValueError, match='set_template'):
        ds.encode()
    with pytest.raises(ValueError, match=r'map\(<Preprocessor>\) first'):
        ds.set_template(char_template()).encode()
    chat = Dataset(data=[{'messages': [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b'}]}])
    assert chat.set_template(char_template()).encode()[0]['input_ids'] == [97, 1, 98, 1]  # MessagesProcessor
    with pytest.raises(ValueError, match='map\\(\\) cannot run on a encoded dataset'):
        chat.map('AlpacaProcessor')


def test_pack(char_template):
    outputs = ['x' * n for n in (7, 3, 5, 1, 9, 2, 6)]  # encoded lengths n + 3 ('q', end, answer, end)
    ds = Dataset(data=[{'instruction': 'q', 'output': o} for o in outputs]).map('AlpacaProcessor')
    ds.set_template(char_template()).encode()
    encoded = list(ds)
    lengths = [r['length'] for r in encoded]
    assert lengths == [10, 6, 8, 4, 12, 5, 9]
    ds.pack(max_length=16)
    rows = list(ds)
    assert all(r['length'] <= 16 for r in rows)
    assert sorted(n for r in rows for n in r['lengths']) == sorted(lengths)  # every sample placed once
    assert len(rows) == 4  # 54 tokens need at least 4 rows of 16
    assert ds.packing_efficiency == pytest.approx(54 / (4 * 16))
    by_len = {r['length']: r for r in encoded}
    for r in rows:
        assert r['position_ids'] == [p for n in r['lengths'] for p in range(n)]
        pos = 0
        for n in r['lengths']:
            sample = by_len[n]
            assert r['input_ids'][pos:pos + n] == sample['input_ids']
            assert r['labels'][pos] == IGNORE_INDEX and r['labels'][pos + 1:pos + n] == sample['labels'][1:]
            pos += n


def test_pack_errors(char_template):
    ds = Dataset(data=[{'instruction': 'q', 'output': 'x' * n} for n in (1, 30)]).map('AlpacaProcessor')
    with pytest.raises(ValueError, match='pack\\(\\) cannot run on a trajectory dataset'):
        ds.pack(8)
    ds.set_template(char_template()).encode()
    with pytest.raises(ValueError, match='needs max_length'):
        ds.pack()
    with pytest.raises(RowError, match='row 1 of <data> \\(pack\\): 33 tokens exceed max_length=16'):
        ds.pack(16)


def test_real_template_with_tiny_qwen3():
    import twinkle.template  # noqa: F401
    ds = Dataset(DatasetMeta('builtin://self-cognition', data_slice=range(100)))
    ds.set_template('Template', model_id='builtin://tiny-qwen3')
    ds.map(SelfCognitionProcessor('twinkle LLM', 'ModelScope community'))
    ds.encode()
    assert len(ds) == 100 and ds.stats == {}
    row = ds[5]
    tok = ds.template.tokenizer
    labelled = [t for t, lab in zip(row['input_ids'], row['labels']) if lab != IGNORE_INDEX]
    assistant = ds.template.encode(Dataset(DatasetMeta('builtin://self-cognition', data_slice=range(5, 6))).map(
        SelfCognitionProcessor('twinkle LLM', 'ModelScope community'))[0])
    assert row['input_ids'] == assistant['input_ids']
    assert 'twinkle LLM' in tok.decode(labelled) or 'ModelScope community' in tok.decode(labelled)
    import twinkle.dataloader as dataloader
    loader = dataloader.DataLoader(dataset=ds, batch_size=8, min_batch_size=8)  # the example
    batches = list(loader)
    assert len(batches) == len(loader) >= 12 and all(len(b) == 8 for b in batches[:12])
    ds.pack(max_length=256)
    assert 0.5 < ds.packing_efficiency <= 1.0 and sum(len(r['lengths']) for r in ds) == 100


def test_right_truncation_leaving_no_labels_is_dropped_and_counted(right_truncated_rows, caplog):
    rows = right_truncated_rows
    ds = Dataset(data=rows).map('AlpacaProcessor')
    ds.set_template('Template', model_id='builtin://tiny-qwen3', max_length=30, truncation_strategy='right')
    with caplog.at_level(logging.WARNING):
        ds.encode(cache=False)
    assert ds.stats == {'no_labels': 1} and len(ds) == 2
    assert [r['length'] for r in ds] == [18, 30]
    assert all(any(lab != IGNORE_INDEX for lab in r['labels']) for r in ds)
    assert 'no_labels' in caplog.text and "truncation_strategy='right'" in caplog.text
    # the drop is part of the cached result too
    again = Dataset(data=rows).map('AlpacaProcessor')
    again.set_template('Template', model_id='builtin://tiny-qwen3', max_length=30, truncation_strategy='right')
    again.encode()
    cached = Dataset(data=rows).map('AlpacaProcessor')
    cached.set_template('Template', model_id='builtin://tiny-qwen3', max_length=30, truncation_strategy='right')
    cached.encode()
    assert cached.last_encode_from_cache and cached.stats == {'no_labels': 1} and list(cached) == list(ds)


def test_rows_without_labels_are_dropped_for_any_template(char_template):
    class NoLabels(type(char_template())):
        def encode(self, trajectory):
            feature = super().encode(trajectory)
            if 'drop' in trajectory['messages'][0]['content']:
                feature['labels'] = [IGNORE_INDEX] * len(feature['labels'])
            return feature

    rows = [{'instruction': q, 'output': 'a'} for q in ('keep', 'drop', 'keep', 'drop', 'drop')]
    ds = Dataset(data=rows).map('AlpacaProcessor').set_template(NoLabels()).encode(cache=False)
    assert len(ds) == 2 and ds.stats == {'no_labels': 3}
