"""Training metrics: accumulate cheaply on every step, reduce and turn into numbers on request."""
from .base import Metric, Reducer, identity_reducer
from .builtin import LossMetric, TokenAccuracyMetric
from .writer import MetricWriter

__all__ = ['Metric', 'Reducer', 'identity_reducer', 'LossMetric', 'TokenAccuracyMetric', 'MetricWriter']
