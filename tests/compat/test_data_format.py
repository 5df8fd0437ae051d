"""Wire types imported from ``twinkle.data_format`` are the ones every component uses."""
import twinkle.data_format as data_format
import twinkle.sampler
import twinkle.types
from twinkle.data_format import InputFeature, Message, SamplingParams, Trajectory


def test_one_definition_in_both_places():
    for name in ('Message', 'Trajectory', 'InputFeature', 'ToolCall', 'Tool', 'ModelOutput', 'IGNORE_INDEX'):
        assert getattr(data_format, name) is getattr(twinkle.types, name)
    assert SamplingParams is twinkle.sampler.SamplingParams
    assert data_format.SampleResponse is twinkle.sampler.SampleResult


def test_types_build_as_a_script_builds_them():
    msg = Message(role='user', content='hi')
    traj = Trajectory(messages=[msg, Message(role='assistant', content='hello')])
    feat = InputFeature(input_ids=[1, 2], labels=[-100, 2], attention_mask=[1, 1])
    assert traj['messages'][0] == {'role': 'user', 'content': 'hi'}
    assert feat['labels'][0] == data_format.IGNORE_INDEX
    assert SamplingParams(max_tokens=8, temperature=0.0).max_tokens == 8
    assert set(data_format.__all__) <= set(dir(data_format))
