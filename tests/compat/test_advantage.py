"""Advantage options passed where a twinkle-kit script passes them: at call time."""
import torch

from twinkle.advantage import GRPOAdvantage, RLOOAdvantage


def test_grpo_and_rloo_take_scale_per_call():
    rewards = [1.0, 0.0, 0.0, 1.0, 2.0, 0.0]  # two prompts x three samples
    adv = GRPOAdvantage()(rewards, num_generations=3, scale='none')
    means = [1 / 3, 1.0]
    want = [r - means[i // 3] for i, r in enumerate(rewards)]
    assert torch.allclose(adv, torch.tensor(want), atol=1e-6)
    adv = GRPOAdvantage()(rewards, num_generations=3, scale='group')
    # the sample (n-1) std, the default
    stds = [torch.tensor(rewards[:3]).std(correction=1), torch.tensor(rewards[3:]).std(correction=1)]
    want = [(r - means[i // 3]) / (stds[i // 3] + 1e-4) for i, r in enumerate(rewards)]
    assert torch.allclose(adv, torch.tensor(want, dtype=torch.float32), atol=1e-5)
    # leave-one-out: 1 - mean(0, 0) = 1, 0 - mean(1, 0) = -0.5
    loo = RLOOAdvantage()(rewards, num_generations=3, scale='none')
    assert torch.allclose(loo[:3], torch.tensor([1.0, -0.5, -0.5]), atol=1e-6)
    assert RLOOAdvantage()(rewards, num_generations=3, scale='group').shape == (6,)
