"""``@remote_class`` and ``@remote_function``: declarations of what may run on other processes.

In local mode they change nothing: a decorated class or method behaves exactly as the undecorated
one. They record metadata that other modes read: Ray mode turns ``Cls(..., remote_group='name')``
into one actor per rank of that group and calls the declared methods on all of them; the HTTP
server and client derive their routes from the same :class:`RemoteSpec` declarations.

``dispatch`` says how a driver-side call's inputs reach the ranks: ``'slice'`` splits them by
data-parallel rank, ``'all'`` sends every rank the same inputs. ``collect`` says how the per-rank
results become one: ``'first'``, ``'mean'``, ``'sum'``, ``'flatten'`` (concatenate lists), or a
callable taking the list of results. ``lazy=True`` lets the driver get a future instead of waiting.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, TypeVar, Union

DISPATCH_MODES = ('slice', 'all')
COLLECT_MODES = ('first', 'mean', 'flatten', 'sum')
SPEC_ATTR = '__twinkle_remote__'
CLASS_ATTR = '__twinkle_remote_class__'

F = TypeVar('F', bound=Callable[..., Any])
C = TypeVar('C', bound=type)

# Set by a mode that places objects elsewhere (Ray): (cls, remote_group, args, kwargs) -> handle, or
# None to build the object here. Absent in local mode, where construction is untouched.
_construct_hook: Optional[Callable[[type, str, tuple, dict], Any]] = None


@dataclass(frozen=True)
class RemoteSpec:
    dispatch: str = 'all'
    collect: Union[str, Callable[[list], Any]] = 'first'
    lazy: bool = False


def set_construct_hook(hook: Optional[Callable[[type, str, tuple, dict], Any]]) -> None:
    global _construct_hook
    _construct_hook = hook


def remote_function(fn: Optional[F] = None, *, dispatch: str = 'all',
                    collect: Union[str, Callable[[list], Any]] = 'first', lazy: bool = False):
    """Mark a method as callable across ranks; usable bare or with arguments. Returns ``fn`` itself."""
    if dispatch not in DISPATCH_MODES:
        raise ValueError(f'remote_function: dispatch={dispatch!r} must be one of {DISPATCH_MODES}')
    if not callable(collect) and collect not in COLLECT_MODES:
        raise ValueError(f'remote_function: collect={collect!r} must be one of {COLLECT_MODES} or a callable')
    spec = RemoteSpec(dispatch=dispatch, collect=collect, lazy=bool(lazy))

    def mark(f: F) -> F:
        if not callable(f):
            raise TypeError(f'remote_function decorates functions, got {type(f).__name__}')
        setattr(f, SPEC_ATTR, spec)
        return f

    return mark(fn) if fn is not None else mark


def get_remote_spec(fn: Any) -> Optional[RemoteSpec]:
    return getattr(fn, SPEC_ATTR, None)


def remote_methods(cls: type) -> Dict[str, RemoteSpec]:
    """Every ``@remote_function`` method of ``cls`` (inherited ones included), by name."""
    out: Dict[str, RemoteSpec] = {}
    for klass in reversed(cls.__mro__):
        for name, attr in vars(klass).items():
            spec = get_remote_spec(attr.__func__ if isinstance(attr, (classmethod, staticmethod)) else attr)
            if spec is not None:
                out[name] = spec
            elif name in out:  # overridden without the decorator
                del out[name]
    return out


def is_remote_class(cls: type) -> bool:
    return bool(getattr(cls, CLASS_ATTR, False))


def remote_class(cls: C) -> C:
    """Mark a class as placeable on a device group. Returns the same class.

    Construction accepts an extra ``remote_group='name'`` keyword. Without a placing mode (local mode)
    it is dropped and the object is built here as usual.
    """
    if not isinstance(cls, type):
        raise TypeError(f'remote_class decorates classes, got {type(cls).__name__}')
    if vars(cls).get(CLASS_ATTR):
        return cls
    # The class is patched in place (its __new__ and __init_subclass__ replaced), which static types do
    # not describe: the patching goes through an untyped name.
    target: Any = cls
    original_new = cls.__new__

    def __new__(klass, *args, **kwargs):
        group = kwargs.get('remote_group')
        if group is not None and _construct_hook is not None:
            handle = _construct_hook(klass, group, args, {k: v for k, v in kwargs.items() if k != 'remote_group'})
            if handle is not None:  # not an instance of klass, so Python skips __init__
                return handle
        if original_new is object.__new__:
            return object.__new__(klass)  # object.__new__ rejects the constructor's arguments
        return original_new(klass, *args, **kwargs)

    new: Any = __new__
    new.__wrapped__ = target.__init__  # inspect.signature(cls) keeps showing the real parameters
    target.__new__ = staticmethod(__new__)
    _accept_remote_group(cls)
    previous = cls.__dict__.get('__init_subclass__')

    def __init_subclass__(sub, **kwargs):
        # Subclasses are remote-capable too: their own __init__ must also ignore remote_group.
        if previous is not None:
            previous.__func__(sub, **kwargs)
        else:
            super(target, sub).__init_subclass__(**kwargs)
        _accept_remote_group(sub)

    target.__init_subclass__ = classmethod(__init_subclass__)
    setattr(cls, CLASS_ATTR, True)
    return cls


def _accept_remote_group(cls: type) -> None:
    """Wrap the ``__init__`` defined on ``cls`` (if any) so that it drops ``remote_group``."""
    init = cls.__dict__.get('__init__')
    if init is None or getattr(init, '_twinkle_drops_remote_group', False):
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        kwargs.pop('remote_group', None)
        init(self, *args, **kwargs)

    # A marked function replacing a method: patched through untyped names, as in remote_class.
    wrapper: Any = __init__
    wrapper._twinkle_drops_remote_group = True
    target: Any = cls
    target.__init__ = wrapper
