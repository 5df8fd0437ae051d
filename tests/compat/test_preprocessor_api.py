"""Built-in preprocessors of twinkle-kit on small in-memory rows."""
from __future__ import annotations

from twinkle.dataset import Dataset, DatasetMeta
from twinkle.preprocessor import (
    AlpacaProcessor,
    CompetitionMathGRPOProcessor,
    CompetitionMathProcessor,
    CountdownProcessor,
    DataFilter,
    Filter,
    GSM8KProcessor,
    SelfCognitionProcessor,
)
from twinkle.reward.base import ground_truth

MATH = [{'problem': 'What is 2+2?', 'solution': 'The answer is 4.'},
        {'problem': 'What is 3*3?', 'solution': 'The answer is \\boxed{9}.'}]


def test_competition_math():
    ds = Dataset(dataset_meta=DatasetMeta(data=MATH)).map(CompetitionMathProcessor())
    assert len(ds) == 2
    assert ds[0]['messages'] == [{'role': 'user', 'content': 'What is 2+2?'},
                                 {'role': 'assistant', 'content': 'The answer is 4.'}]
    assert Dataset(DatasetMeta(data=MATH)).map('CompetitionMathProcessor')[1]['messages'][0]['role'] == 'user'


def test_competition_math_grpo():
    ds = Dataset(dataset_meta=DatasetMeta(data=MATH)).map(CompetitionMathGRPOProcessor())
    sample = ds[0]
    assert [m['role'] for m in sample['messages']] == ['system', 'user', 'assistant']
    assert 'math assistant' in sample['messages'][0]['content'].lower()
    assert sample['messages'][1]['content'] == 'What is 2+2?' and sample['messages'][2]['content'] == ''
    assert len(sample['user_data']) == 1 and list(sample['user_data'][0]) == ['solution', 'The answer is 4.']
    assert ground_truth(sample) == 'The answer is 4.'


def test_gsm8k():
    rows = [{'question': 'Tom has 3 apples and buys 1,200 more. How many?', 'answer': 'He has 1203.\n#### 1,203'},
            {'question': 'No answer yet?', 'answer': 'none'}]
    ds = Dataset(DatasetMeta(data=rows)).map('GSM8KProcessor')
    assert [m['role'] for m in ds[0]['messages']] == ['system', 'user']
    assert ds[0]['messages'][1]['content'] == rows[0]['question']
    assert [list(p) for p in ds[0]['user_data']] == [['ground_truth', '1203']]
    assert ground_truth(ds[0]) == '1203' and ds[1]['user_data'][0][1] == ''
    assert GSM8KProcessor().extract_ground_truth('so #### -7.5') == '-7.5'


def test_countdown():
    ds = Dataset(DatasetMeta(data=[{'nums': [1, 2, 3], 'target': 6}, {'nums': [4, 5], 'response': 20}]))
    ds.map(CountdownProcessor())
    assert [m['role'] for m in ds[0]['messages']] == ['system', 'user']
    assert '[1, 2, 3]' in ds[0]['messages'][1]['content'] and '6' in ds[0]['messages'][1]['content']
    assert ds[0]['user_data'] == [{'target': 6, 'nums': [1, 2, 3]}]
    assert ds[1]['user_data'][0]['target'] == 20


def test_self_cognition_adds_the_system_message():
    rows = [{'query': 'What is {{NAME}}?', 'response': '{{NAME}} is a language model developed by {{AUTHOR}}.'}]
    ds = Dataset(DatasetMeta(data=rows)).map(SelfCognitionProcessor('twinkle模型', 'twinkle团队'))
    assert ds[0]['messages'] == [
        {'role': 'system', 'content': 'You are a helpful assistant.'},
        {'role': 'user', 'content': 'What is twinkle模型?'},
        {'role': 'assistant', 'content': 'twinkle模型 is a language model developed by twinkle团队.'}]
    by_keywords = SelfCognitionProcessor(model_name='m', model_author='a', system=None)
    assert by_keywords(rows[0])['messages'][0]['role'] == 'user'


def test_alpaca_and_filter_base_name():
    out = AlpacaProcessor()({'instruction': 'Translate', 'input': 'Hello', 'output': '你好'})
    assert out['messages'][0]['content'] == 'Translate\nHello'
    assert DataFilter is Filter
