"""Raw rows -> standard trajectories (``Preprocessor``), and row filters (``Filter``)."""
from twinkle.preprocessor.alpaca import AlpacaProcessor
from twinkle.preprocessor.base import Filter, Preprocessor
from twinkle.preprocessor.filters import EmptyFilter, LengthFilter
from twinkle.preprocessor.math_tasks import (
    CompetitionMathGRPOProcessor,
    CompetitionMathProcessor,
    CountdownProcessor,
    GSM8KProcessor,
)
from twinkle.preprocessor.messages import MessagesProcessor
from twinkle.preprocessor.self_cognition import SelfCognitionProcessor

DataFilter = Filter  # the filter base class, under the name other twinkle versions use

__all__ = ['Preprocessor', 'Filter', 'SelfCognitionProcessor', 'AlpacaProcessor', 'MessagesProcessor',
           'LengthFilter', 'EmptyFilter', 'DataFilter', 'CompetitionMathProcessor', 'CompetitionMathGRPOProcessor',
           'GSM8KProcessor', 'CountdownProcessor']
