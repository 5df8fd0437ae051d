from .model import TransformersModel

__all__ = ['TransformersModel']
