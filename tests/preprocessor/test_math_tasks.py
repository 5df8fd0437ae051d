"""Math / GSM8K / Countdown preprocessors: fields, ground truth, and errors naming the field."""
from __future__ import annotations

import pytest

from twinkle.preprocessor import (
    CompetitionMathGRPOProcessor,
    CompetitionMathProcessor,
    CountdownProcessor,
    GSM8KProcessor,
)
from twinkle.preprocessor.math_tasks import gsm8k_answer
from twinkle.registry import available


def test_registered_by_name():
    assert {'CompetitionMathProcessor', 'CompetitionMathGRPOProcessor', 'GSM8KProcessor',
            'CountdownProcessor'} <= set(available('preprocessor'))


@pytest.mark.parametrize('answer,expected', [('#### 42', '42'), ('so\n#### 1,234', '1234'), ('#### -3.5', '-3.5'),
                                             ('####7', '7'), ('no marker 42', '')])
def test_gsm8k_answer(answer, expected):
    assert gsm8k_answer(answer) == expected


def test_missing_fields_are_named():
    with pytest.raises(ValueError, match="missing field 'solution'"):
        CompetitionMathProcessor()({'problem': 'p'})
    with pytest.raises(ValueError, match="missing field 'problem'"):
        CompetitionMathGRPOProcessor()({'solution': 's'})
    with pytest.raises(ValueError, match="missing field 'question'"):
        GSM8KProcessor()({'answer': '#### 1'})
    with pytest.raises(ValueError, match="missing field 'nums'"):
        CountdownProcessor()({'target': 3})
    with pytest.raises(ValueError, match="missing field 'target'"):
        CountdownProcessor()({'nums': [1]})


def test_custom_system_prompts():
    assert CompetitionMathGRPOProcessor(system='S')({'problem': 'p', 'solution': 's'})['messages'][0]['content'] == 'S'
    assert GSM8KProcessor(system='G')({'question': 'q'})['messages'][0]['content'] == 'G'
    assert CountdownProcessor(system='C')({'nums': [1], 'target': 1})['messages'][0]['content'] == 'C'
