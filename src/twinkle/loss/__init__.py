"""Training losses. Every loss returns a sum and the number of units it summed over (see base.py)."""
from twinkle.loss.base import Loss, LossOutput
from twinkle.loss.chunked_cross_entropy import ChunkedCrossEntropyLoss
from twinkle.loss.cross_entropy import CrossEntropyLoss
from twinkle.loss.gkd import GKDLoss, generalized_jsd
from twinkle.loss.liger_fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
from twinkle.loss.mapping import torch_loss_mapping
from twinkle.loss.mse import MSELoss
from twinkle.loss.odds_preference import CPOLoss, ORPOLoss
from twinkle.loss.policy import (
    CISPOLoss,
    GRPOLoss,
    GSPOLoss,
    ImportanceSamplingLoss,
    PolicyLoss,
    PPOLoss,
    aggregate,
    kl_penalty,
)
from twinkle.loss.policy_variants import BNPOLoss, DRGRPOLoss, SAPOLoss
from twinkle.loss.preference import DPOLoss, SimPOLoss
from twinkle.loss.utils import entropy_from_logits, loss_mask, token_logprobs

__all__ = [
    'Loss', 'LossOutput', 'CrossEntropyLoss', 'PolicyLoss', 'GRPOLoss', 'GSPOLoss', 'CISPOLoss',
    'ImportanceSamplingLoss', 'PPOLoss', 'DPOLoss', 'SimPOLoss', 'token_logprobs', 'entropy_from_logits',
    'loss_mask', 'kl_penalty', 'aggregate', 'MSELoss', 'CPOLoss', 'ORPOLoss', 'SAPOLoss', 'BNPOLoss',
    'DRGRPOLoss', 'GKDLoss', 'generalized_jsd', 'ChunkedCrossEntropyLoss', 'LigerFusedLinearCrossEntropyLoss',
    'torch_loss_mapping'
]
