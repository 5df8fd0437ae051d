"""cookbook/grpo.py learns: with a fixed seed the exact-match accuracy of the last steps is far above the first."""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location('cookbook_grpo',
                                               Path(__file__).resolve().parents[2] / 'cookbook' / 'grpo.py')
grpo = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(grpo)


def _mean(rows, key='reward_mean'):
    return sum(r[key] for r in rows) / len(rows)


@pytest.fixture
def one_thread():
    # The curve in the README was measured with one intra-op thread; float sums (and so a sampled token
    # here and there) depend on how many threads split them.
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_grpo_accuracy_rises(tmp_path, capsys, one_thread):
    history = grpo.main(['--seed', '1', '--quiet', '--output-dir', str(tmp_path)])
    assert len(history) == 40
    accuracy = [h['accuracy'] for h in history]
    first, last = sum(accuracy[:5]) / 5, sum(accuracy[-5:]) / 5
    assert last >= first + 0.3, [round(a, 2) for a in accuracy]
    assert _mean(history[-5:]) > _mean(history[:5]) + 0.15
    assert [h['accuracy'] for h in json.loads((tmp_path / 'history.json').read_text())] == accuracy
    for key in ('reward_std', 'kl', 'clip_frac', 'entropy', 'response_length_mean', 'ratio_mean'):
        assert all(key in h for h in history), key
    assert max(h['clip_frac'] for h in history) > 0  # the second update of a batch is off-policy
    assert all(h['sync_full'] == 0.0 for h in history)  # only the adapter travels after the first sync
    assert 'reward: first steps' in capsys.readouterr().out


def test_same_seed_same_run(tmp_path):
    small = ['--warmup-steps', '3', '--steps', '2', '--prompts-per-step', '3', '--group-size', '4', '--quiet']
    runs = [grpo.main(small + ['--seed', str(seed), '--output-dir', str(tmp_path / str(i))])
            for i, seed in enumerate((3, 3, 4))]
    keys = ('accuracy', 'reward_mean', 'loss', 'kl', 'entropy')
    same, other = [[[h[k] for k in keys] for h in run] for run in runs[:2]], [[h[k] for k in keys] for h in runs[2]]
    assert same[0] == same[1]
    assert other != same[0]


def test_exact_match_reward():
    traj = lambda text: {'messages': [{'role': 'assistant', 'content': text}], 'ground_truth': '7'}  # noqa: E731
    assert [grpo.exact_match(traj(t)) for t in ('7', '07', '7 ', '17', '7=7', '')] == [1.0, 0, 0, 0, 0, 0]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    args = grpo.parse_args(['--warmup-steps', '0', '--prompts-per-step', '2', '--group-size', '2', '--quiet'])
    tasks = grpo.load_tasks(args.data)
    model_dir = grpo.warm_up(args, tasks, tmp_path_factory.mktemp('grpo'))
    return (args, tasks) + tuple(grpo.build(args, model_dir))


def test_a_reward_of_the_wrong_length_is_named(setup):
    from twinkle.advantage import GRPOAdvantage
    from twinkle.reward import FunctionReward
    args, tasks, model, sampler, engine = setup
    short = FunctionReward(lambda trajectories: [1.0] * (len(trajectories) - 1), batched=True, name='short')
    with pytest.raises(ValueError, match=r'FunctionReward\(short\) returned 3 rewards for 4 trajectories'):
        grpo.rl_step(0, args, tasks[:4], model, sampler, engine, short, GRPOAdvantage(), random.Random(0))


def test_a_group_size_that_does_not_divide_the_batch(setup):
    from twinkle.advantage import GRPOAdvantage
    args, tasks, model, sampler, engine = setup
    bad = grpo.parse_args(['--prompts-per-step', '2', '--group-size', '2', '--quiet'])
    bad.group_size = 3  # the advantage is told 3 while the sampler drew 2 per prompt
    real_sample = sampler.sample
    sampler.sample = lambda prompts, params, **kw: real_sample(prompts, {**vars(params), 'n': 2}, **kw)
    try:
        with pytest.raises(ValueError, match='num_generations=3 does not divide the batch of 4'):
            grpo.rl_step(0, bad, tasks[:4], model, sampler, engine, grpo.build_reward(args), GRPOAdvantage(),
                         random.Random(0))
    finally:
        sampler.sample = real_sample


def test_missing_old_logprobs_for_the_clipped_loss(setup):
    args, tasks, model, sampler, engine = setup
    sample = {'input_ids': [1, 5, 6, 7], 'labels': [-100, -100, 6, 7], 'advantages': 1.0}
    with pytest.raises(ValueError, match=r'needs inputs\["old_logps"\]'):
        model.forward_backward(inputs=[sample])


def test_bad_task_file(tmp_path):
    path = tmp_path / 'tasks.jsonl'
    path.write_text('{"messages": [{"role": "user", "content": "1+1="}]}\n')
    with pytest.raises(ValueError, match='line 1 needs "messages" and "ground_truth"'):
        grpo.load_tasks(str(path))


def test_closeness_reward():
    traj = lambda text: {'messages': [{'role': 'assistant', 'content': text}], 'ground_truth': '7'}  # noqa: E731
    assert [grpo.closeness(traj(t)) for t in ('7', '9', '12', '20', 'x')] == [1.0, 0.6, 0.0, 0.0, 0.0]
