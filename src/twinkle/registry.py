"""Name -> object resolution for every component kind.

Each kind ('template', 'preprocessor', 'loss', 'scheduler', ...) has its own table, so that a
string such as ``'Template'`` or ``'CosineWarmupScheduler'`` in a user's script resolves to exactly
one class, and a typo produces a list of the close matches instead of an ``AttributeError`` deep in
the stack. Nothing is imported from outside the package unless a caller passes the object itself.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, TypeVar

T = TypeVar('T', bound=Callable[..., Any])  # classes and functions

_TABLES: Dict[str, Dict[str, Any]] = {}

# Modules whose import fills a kind's table. Importing lazily keeps `import twinkle` cheap and
# lets `resolve('loss', 'CrossEntropyLoss')` work without the caller importing twinkle.loss first.
_PROVIDERS: Dict[str, Iterable[str]] = {
    'template': ('twinkle.template',),
    'preprocessor': ('twinkle.preprocessor',),
    'filter': ('twinkle.preprocessor',),
    'processor': ('twinkle.processor',),
    'loss': ('twinkle.loss',),
    'metric': ('twinkle.metric',),
    'scheduler': ('twinkle.optim',),
    'optimizer': ('twinkle.optim',),
    'patch': ('twinkle.patch',),
    'reward': ('twinkle.reward',),
    'advantage': ('twinkle.advantage',),
    'sampler': ('twinkle.sampler',),
    'checkpoint_engine': ('twinkle.checkpoint_engine',),
}


class RegistryError(KeyError):
    """An unknown component name; the message lists what is registered and the close matches."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def register(kind: str, name: Optional[str] = None) -> Callable[[T], T]:
    """Decorator: make ``obj`` resolvable as ``name`` (default: its ``__name__``) within ``kind``."""

    def deco(obj: T) -> T:
        key = name or obj.__name__
        table = _TABLES.setdefault(kind, {})
        if key in table and table[key] is not obj:
            raise ValueError(f'{kind} {key!r} is registered twice ({table[key]!r} and {obj!r}); '
                             f'give one of them another name')
        table[key] = obj
        return obj

    return deco


def _load_providers(kind: str) -> None:
    for module in _PROVIDERS.get(kind, ()):
        importlib.import_module(module)


def available(kind: str) -> list[str]:
    _load_providers(kind)
    return sorted(_TABLES.get(kind, {}))


def resolve(kind: str, name_or_obj: Any) -> Any:
    """Return the registered object for a name; anything that is not a string is returned as is."""
    if not isinstance(name_or_obj, str):
        return name_or_obj
    _load_providers(kind)
    table = _TABLES.get(kind, {})
    if name_or_obj in table:
        return table[name_or_obj]
    lowered = {k.lower(): k for k in table}
    if name_or_obj.lower() in lowered:
        return table[lowered[name_or_obj.lower()]]
    close = difflib.get_close_matches(name_or_obj, list(table), n=5, cutoff=0.5)
    hint = f' Did you mean {", ".join(repr(c) for c in close)}?' if close else ''
    raise RegistryError(f'Unknown {kind} {name_or_obj!r}.{hint} Registered {kind}s: '
                        f'{", ".join(sorted(table)) or "(none)"}. Pass a class or register one with '
                        f'@twinkle.registry.register({kind!r}).')


def build(kind: str, name_or_obj: Any, kwargs: Mapping[str, Any], caller: str) -> Any:
    """A registered name or a class, built with ``kwargs``; any other object as it is. ``kwargs`` with an
    object are refused rather than lost; ``caller`` names the call for the message."""
    obj = resolve(kind, name_or_obj)
    if isinstance(obj, type):
        return obj(**kwargs)
    if kwargs:
        raise ValueError(f'{caller}: keyword arguments {sorted(kwargs)} apply only when the {kind} is given by name '
                         f'or class; pass them to its constructor instead')
    return obj
