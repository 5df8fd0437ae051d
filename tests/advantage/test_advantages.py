import numpy as np
import pytest
import torch

from twinkle.advantage import Advantage, GRPOAdvantage, ReinforcePlusPlusAdvantage, RLOOAdvantage
from twinkle.registry import resolve

REWARDS = [1.0, 0.0, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0, -1.0, 3.0, 0.0, 0.25]
G = 4


def np_groups():
    return np.asarray(REWARDS, dtype=np.float64).reshape(-1, G)


@pytest.mark.parametrize('std_unbiased', [True, False])
@pytest.mark.parametrize('scale', ['group', 'batch', 'none'])
def test_grpo_advantage_matches_numpy(scale, std_unbiased):
    g = np_groups()
    ddof = 1 if std_unbiased else 0
    centred = g - g.mean(axis=1, keepdims=True)
    if scale == 'group':
        want = centred / (g.std(axis=1, ddof=ddof, keepdims=True) + 1e-4)
    elif scale == 'batch':
        want = centred / (g.std(ddof=ddof) + 1e-4)
    else:
        want = centred
    got = resolve('advantage', 'GRPOAdvantage')(scale=scale, std_unbiased=std_unbiased)(REWARDS, G)
    assert got.dtype == torch.float32 and got.shape == (12,)
    np.testing.assert_allclose(got.numpy(), want.reshape(-1), rtol=1e-6, atol=1e-6)
    # the all-equal group carries no signal
    assert torch.all(got[4:8] == 0)


def test_rloo_matches_leave_one_out_loop():
    want = []
    for grp in np_groups():
        for i in range(G):
            want.append(grp[i] - np.delete(grp, i).mean())
    got = RLOOAdvantage()(torch.tensor(REWARDS), G)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_reinforce_plus_plus_baseline():
    g = np_groups()
    centred = g - g.mean(axis=1, keepdims=True)
    want = (centred - centred.mean()) / (centred.std() + 1e-4)
    got = ReinforcePlusPlusAdvantage()(REWARDS, G)
    np.testing.assert_allclose(got.numpy(), want.reshape(-1), rtol=1e-6, atol=1e-6)
    assert abs(float(got.mean())) < 1e-6 and float(got.std(correction=0)) == pytest.approx(1.0, abs=1e-3)


def test_accepts_column_tensor_and_single_group():
    got = GRPOAdvantage()(torch.tensor([[1.0], [0.0]]), 2)
    std = 0.5 ** 0.5  # sample std of [1, 0]
    np.testing.assert_allclose(got.numpy(), [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)], rtol=1e-6)
    got = GRPOAdvantage(std_unbiased=False)(torch.tensor([[1.0], [0.0]]), 2)
    np.testing.assert_allclose(got.numpy(), [0.5 / (0.5 + 1e-4), -0.5 / (0.5 + 1e-4)], rtol=1e-6)


def test_grpo_default_std_is_the_sample_std():
    # The convention of the GRPO reference implementations: +-0.866 for [0, 1, 1, 0], not +-1.
    got = GRPOAdvantage(eps=0.0)([0.0, 1.0, 1.0, 0.0], 4)
    np.testing.assert_allclose(got.numpy(), [-0.8660254, 0.8660254, 0.8660254, -0.8660254], rtol=1e-6)
    got = GRPOAdvantage(eps=0.0, std_unbiased=False)([0.0, 1.0, 1.0, 0.0], 4)
    np.testing.assert_allclose(got.numpy(), [-1.0, 1.0, 1.0, -1.0], rtol=1e-6)
    got = GRPOAdvantage(scale='batch', eps=0.0)([0.0, 1.0, 1.0, 0.0, 2.0, 2.0], 2)
    np.testing.assert_allclose(got.numpy(), np.array([-0.5, 0.5, 0.5, -0.5, 0.0, 0.0]) / np.std(
        [0.0, 1.0, 1.0, 0.0, 2.0, 2.0], ddof=1), rtol=1e-6)


def test_grpo_one_generation_per_prompt_keeps_a_learning_signal():
    rewards = [0.0, 1.0, 0.5, 1.0]
    # A group of one has no baseline: the raw rewards, not zeros.
    np.testing.assert_allclose(GRPOAdvantage()(rewards, 1).numpy(), rewards)
    # With batch or no scaling the batch is the baseline.
    centred = np.asarray(rewards) - np.mean(rewards)
    np.testing.assert_allclose(GRPOAdvantage(scale='none')(rewards, 1).numpy(), centred, rtol=1e-6)
    np.testing.assert_allclose(GRPOAdvantage(scale='batch')(rewards, 1).numpy(),
                               centred / (np.std(rewards, ddof=1) + 1e-4), rtol=1e-6)
    assert torch.all(torch.isfinite(GRPOAdvantage(scale='batch')([3.0], 1)))


def test_bad_inputs():
    with pytest.raises(ValueError, match='num_generations=5 does not divide the batch of 12 rewards'):
        GRPOAdvantage()(REWARDS, 5)
    with pytest.raises(ValueError, match='RLOOAdvantage: num_generations=5 does not divide the batch of 12'):
        RLOOAdvantage()(REWARDS, 5)
    with pytest.raises(ValueError, match='positive int'):
        GRPOAdvantage()(REWARDS, 0)
    with pytest.raises(ValueError, match='num_generations >= 2'):
        RLOOAdvantage()(REWARDS, 1)
    with pytest.raises(ValueError, match='scale'):
        GRPOAdvantage(scale='global')
    with pytest.raises(ValueError, match='flat list'):
        GRPOAdvantage()(torch.zeros(2, 3), 3)
    with pytest.raises(ValueError, match='reward 1 is nan'):
        GRPOAdvantage()([0.0, float('nan')], 2)
    with pytest.raises(NotImplementedError):
        Advantage()([1.0, 2.0], 2)


def test_options_at_call_time_apply_to_that_call_only():
    adv = GRPOAdvantage()
    g = np_groups()
    centred = g - g.mean(axis=1, keepdims=True)
    got = adv(REWARDS, G, scale='batch', eps=0.5)
    np.testing.assert_allclose(got.numpy(), (centred / (g.std(ddof=1) + 0.5)).reshape(-1), rtol=1e-6)
    np.testing.assert_allclose(adv(REWARDS, G, scale='none').numpy(), centred.reshape(-1), rtol=1e-6)
    assert adv.scale == 'group' and adv.eps == 1e-4
    np.testing.assert_allclose(adv(REWARDS, G).numpy(),
                               (centred / (g.std(axis=1, ddof=1, keepdims=True) + 1e-4)).reshape(-1), rtol=1e-6)
    with pytest.raises(TypeError,
                       match=r"unknown option\(s\) \['scal'\]; it accepts \['scale', 'eps', 'std_unbiased'\]"):
        adv(REWARDS, G, scal='batch')
    with pytest.raises(ValueError, match="scale must be one of"):
        adv(REWARDS, G, scale='global')


@pytest.mark.parametrize('scale', ['group', 'batch'])
def test_rloo_scale(scale):
    g = np_groups()
    loo = np.array([[grp[i] - np.delete(grp, i).mean() for i in range(G)] for grp in g])
    std = g.std(axis=1, ddof=1, keepdims=True) if scale == 'group' else g.std(ddof=1)
    got = RLOOAdvantage()(REWARDS, G, scale=scale)
    np.testing.assert_allclose(got.numpy(), (loo / (std + 1e-4)).reshape(-1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(RLOOAdvantage(scale=scale)(REWARDS, G).numpy(), got.numpy())
