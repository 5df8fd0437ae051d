import re

import pytest

from twinkle.registry import resolve
from twinkle.reward import (
    CombinedReward,
    FormatReward,
    FunctionReward,
    LengthPenaltyReward,
    MathAccuracyReward,
    Reward,
    extract_answer,
    rl_batch_metrics,
)


def traj(completion, gt=None, key='ground_truth'):
    t = {'messages': [{'role': 'system', 'content': 'Solve.'}, {'role': 'user', 'content': 'What is 6 * 7?'},
                      {'role': 'assistant', 'content': completion}]}
    if gt is not None:
        t[key] = gt
    return t


@pytest.mark.parametrize('completion,gt,expected', [
    ('6 times 7 is 42, so the answer is $\\boxed{42}$.', '42', 1.0),
    ('We get \\boxed{\\dfrac{1}{2}}', '0.5', 1.0),
    ('\\boxed{\\frac{3}{4}} is wrong, the right one is \\boxed{\\frac{1}{2}}', '\\frac12', 1.0),
    ('Natalia sold 48/2 = 24 clips in May.\nAltogether 48+24 = 72.\n#### 72', '72', 1.0),
    ('The answer is 1,000 apples.', '1000', 1.0),
    ('Final answer: x = 5', '5', 1.0),
    ('I think it is 41.', '42', 0.0),
    ('So we have \\boxed{42', '42', 0.0),  # truncated box
    ('The answer is $\\boxed{\\text{(B)}}$', '(B)', 1.0),
    ('no number here', '3', 0.0),
    ('The result is 12.5%', '12.5', 1.0),
    ('It equals \\boxed{-3}', 'so it is \\boxed{-3}', 1.0),  # reference given as a full solution
    ('So 18 in total.', 'Janet has 16 - 3 - 4 = 9 eggs... 9 * 2 = 18\n#### 18', 1.0),
])
def test_math_accuracy_on_realistic_completions(completion, gt, expected):
    assert MathAccuracyReward()([traj(completion, gt)]) == [expected]


def test_math_reward_reads_solution_field_and_custom_values():
    reward = resolve('reward', 'MathAccuracyReward')(correct=2.0, incorrect=-1.0)
    assert reward([traj('\\boxed{7}', '7', key='solution'), traj('\\boxed{8}', '7', key='answer')]) == [2.0, -1.0]


def test_math_reward_errors_name_the_trajectory():
    with pytest.raises(ValueError, match='trajectory 1 has no reference answer'):
        MathAccuracyReward()([traj('\\boxed{1}', '1'), traj('\\boxed{1}')])
    with pytest.raises(ValueError, match='trajectory 0 has no assistant message'):
        MathAccuracyReward()([{'messages': [{'role': 'user', 'content': 'hi'}], 'ground_truth': '1'}])


def test_extract_answer_priorities():
    assert extract_answer('first 3 then \\boxed{\\sqrt{2}} then 9') == '\\sqrt{2}'
    assert extract_answer('answer is 5\n#### 6') == '6'
    assert extract_answer('values 1, 2 and 3') == '3'
    assert extract_answer('nothing') is None


def test_format_reward_modes():
    good = '<think>6*7</think>\n<answer>42</answer>'
    bad = 'The answer is 42 <answer>42</answer>'
    assert FormatReward()([traj(good), traj(bad)]) == [1.0, 0.0]
    assert FormatReward(r'<answer>\d+</answer>', mode='search')([traj(good), traj(bad)]) == [1.0, 1.0]
    assert FormatReward(r'\d+', mode='fullmatch', reward=0.5, penalty=-0.5)([traj(' 42 '), traj('42!')]) == [0.5, -0.5]
    assert FormatReward(r'ANSWER', mode='search', flags=re.IGNORECASE)([traj(good)]) == [1.0]
    with pytest.raises(ValueError, match='not a valid regular expression'):
        FormatReward('(unclosed')
    with pytest.raises(ValueError, match='mode'):
        FormatReward('x', mode='findall')


def test_length_penalty_formula():
    r = LengthPenaltyReward(target_length=10, penalty_per_unit=0.1, max_penalty=0.5)
    assert r([traj('a' * 5), traj('a' * 10), traj('a' * 13), traj('a' * 100)]) == pytest.approx([0, 0, -0.3, -0.5])
    words = LengthPenaltyReward(target_length=2, penalty_per_unit=1.0, max_penalty=10, unit='words')
    assert words([traj('one two three four')]) == [-2.0]

    class Tok:
        def encode(self, text, add_special_tokens=True):
            return list(text.replace(' ', ''))

    toks = LengthPenaltyReward(target_length=3, penalty_per_unit=0.25, unit='tokens', tokenizer=Tok())
    assert toks([traj('ab cd e')]) == [-0.5]
    with pytest.raises(ValueError, match='tokenizer'):
        LengthPenaltyReward(5, unit='tokens')


def test_function_reward_and_wrong_length_errors():
    per_sample = FunctionReward(lambda t: float(len(t['messages'])))
    assert per_sample([traj('x'), traj('y')]) == [3.0, 3.0]

    def two_values(trajectories):
        return [1.0, 0.0]

    batched = FunctionReward(two_values, batched=True)
    with pytest.raises(ValueError, match=r'FunctionReward\(two_values\) returned 2 rewards for 3 trajectories'):
        batched([traj('a'), traj('b'), traj('c')])

    class Broken(Reward):
        def __call__(self, trajectories, **kwargs):
            return [0.0]

    with pytest.raises(ValueError, match='Broken returned 1 rewards for 2 trajectories'):
        Broken()([traj('a'), traj('b')])

    class NotNumber(Reward):
        def __call__(self, trajectories, **kwargs):
            return ['good']

    with pytest.raises(ValueError, match="NotNumber returned 'good' for trajectory 0"):
        NotNumber()([traj('a')])
    with pytest.raises(ValueError, match='finite'):
        FunctionReward(lambda t: float('nan'))([traj('a')])


def test_combined_reward_weights_and_components():
    combined = CombinedReward(['MathAccuracyReward', FormatReward(r'.*\\boxed\{.*\}.*'),
                               lambda t: -0.1], weights=[1.0, 0.5, 2.0])
    out = combined([traj('\\boxed{42}', '42'), traj('it is 41', '42')])
    assert out == pytest.approx([1.0 + 0.5 - 0.2, 0.0 + 0.0 - 0.2])
    assert combined.last_components['MathAccuracyReward'] == [1.0, 0.0]
    assert combined.last_components['FormatReward'] == [1.0, 0.0]
    with pytest.raises(ValueError, match='2 rewards but 1 weights'):
        CombinedReward(['FormatReward', 'MathAccuracyReward'], weights=[1.0])
    bad = CombinedReward([FunctionReward(lambda ts: [1.0], batched=True, name='short')])
    with pytest.raises(ValueError, match=r'FunctionReward\(short\) returned 1 rewards for 2'):
        bad([traj('a'), traj('b')])


def test_rl_batch_metrics():
    m = rl_batch_metrics([1.0, 0.0, 1.0, 1.0], response_lengths=[10, 20, 30, 40], num_generations=2)
    assert m['reward_mean'] == 0.75
    assert m['reward_std'] == pytest.approx(0.4330127, rel=1e-6)
    assert (m['reward_min'], m['reward_max']) == (0.0, 1.0)
    assert (m['response_length_mean'], m['response_length_min'], m['response_length_max']) == (25.0, 10.0, 40.0)
    assert m['frac_groups_zero_std'] == 0.5
    with pytest.raises(ValueError, match='4 rewards but 3 response lengths'):
        rl_batch_metrics([1, 2, 3, 4], [1, 2, 3])
    with pytest.raises(ValueError, match='num_generations=3'):
        rl_batch_metrics([1, 2, 3, 4], num_generations=3)
