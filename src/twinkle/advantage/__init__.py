"""Advantage estimators: ``Advantage.__call__(rewards, num_generations) -> Tensor``."""
from twinkle.advantage.base import Advantage, GRPOAdvantage, ReinforcePlusPlusAdvantage, RLOOAdvantage

__all__ = ['Advantage', 'GRPOAdvantage', 'RLOOAdvantage', 'ReinforcePlusPlusAdvantage']
