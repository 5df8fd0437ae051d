"""Training metrics: accumulate cheaply on every step, reduce and turn into numbers on request."""
from .base import Metric, Reducer, identity_reducer
from .builtin import LossMetric, TokenAccuracyMetric
from .embedding import EmbeddingMetric
from .rl import CISPOMetric, CompletionRewardMetric, DPOMetric, GRPOMetric, GSPOMetric
from .sums import SumsMetric
from .train import Accuracy, TrainMetric
from .writer import MetricWriter

__all__ = [
    'Metric', 'Reducer', 'identity_reducer', 'LossMetric', 'TokenAccuracyMetric', 'MetricWriter', 'Accuracy',
    'TrainMetric', 'CompletionRewardMetric', 'DPOMetric', 'GRPOMetric', 'GSPOMetric', 'CISPOMetric',
    'EmbeddingMetric', 'SumsMetric'
]
