"""Rewards for RL: ``Reward.__call__(trajectories) -> list[float]``, one value per trajectory."""
from twinkle.reward.base import Reward, check_rewards, completion_text, ground_truth
from twinkle.reward.math_answer import MathAccuracyReward, answers_match, extract_answer, normalize_answer
from twinkle.reward.metrics import rl_batch_metrics
from twinkle.reward.simple import CombinedReward, FormatReward, FunctionReward, LengthPenaltyReward

__all__ = [
    'Reward', 'MathAccuracyReward', 'FormatReward', 'LengthPenaltyReward', 'FunctionReward', 'CombinedReward',
    'rl_batch_metrics', 'extract_answer', 'normalize_answer', 'answers_match', 'completion_text',
    'ground_truth', 'check_rewards'
]
