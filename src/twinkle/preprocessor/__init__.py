"""Raw rows -> standard trajectories (``Preprocessor``), and row filters (``Filter``)."""
from twinkle.preprocessor.alpaca import AlpacaProcessor
from twinkle.preprocessor.base import Filter, Preprocessor
from twinkle.preprocessor.filters import EmptyFilter, LengthFilter
from twinkle.preprocessor.messages import MessagesProcessor
from twinkle.preprocessor.self_cognition import SelfCognitionProcessor

__all__ = ['Preprocessor', 'Filter', 'SelfCognitionProcessor', 'AlpacaProcessor', 'MessagesProcessor',
           'LengthFilter', 'EmptyFilter']
