"""``torch_loss_mapping``: short loss names to the loss classes, for configs and command lines."""
from __future__ import annotations

from typing import Dict, Type

from twinkle.loss.base import Loss
from twinkle.loss.chunked_cross_entropy import ChunkedCrossEntropyLoss
from twinkle.loss.cross_entropy import CrossEntropyLoss
from twinkle.loss.gkd import GKDLoss
from twinkle.loss.liger_fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
from twinkle.loss.mse import MSELoss
from twinkle.loss.odds_preference import CPOLoss, ORPOLoss
from twinkle.loss.policy import CISPOLoss, GRPOLoss, GSPOLoss, ImportanceSamplingLoss, PPOLoss
from twinkle.loss.policy_variants import BNPOLoss, DRGRPOLoss, SAPOLoss
from twinkle.loss.preference import DPOLoss, SimPOLoss

torch_loss_mapping: Dict[str, Type[Loss]] = {
    'cross_entropy': CrossEntropyLoss,
    'chunked_cross_entropy': ChunkedCrossEntropyLoss,
    'liger_fused_linear_cross_entropy': LigerFusedLinearCrossEntropyLoss,
    'mse': MSELoss,
    'dpo': DPOLoss,
    'simpo': SimPOLoss,
    'cpo': CPOLoss,
    'orpo': ORPOLoss,
    'grpo': GRPOLoss,
    'gspo': GSPOLoss,
    'sapo': SAPOLoss,
    'cispo': CISPOLoss,
    'bnpo': BNPOLoss,
    'dr_grpo': DRGRPOLoss,
    'ppo': PPOLoss,
    'importance_sampling': ImportanceSamplingLoss,
    'gkd': GKDLoss,
}
