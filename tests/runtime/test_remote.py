import inspect
import pickle

import pytest

from twinkle import remote_class, remote_function
from twinkle.runtime import remote
from twinkle.runtime.remote import RemoteSpec, get_remote_spec, is_remote_class, remote_methods


@remote_class
class Counter:
    """A counter."""

    def __init__(self, start: int = 0, *, step: int = 1):
        self.value = start
        self.step = step

    @remote_function(dispatch='slice', collect='mean')
    def add(self, n: int) -> int:
        self.value += n * self.step
        return self.value

    @remote_function
    def get(self) -> int:
        return self.value


class Child(Counter):
    def __init__(self, name: str):
        super().__init__(start=10)
        self.name = name

    def get(self) -> int:  # overridden without the decorator: no longer remote
        return -1


def _plain_add(self, n):
    return n


def test_remote_function_records_spec_and_returns_the_same_function():
    decorated = remote_function(dispatch='all', collect=sum, lazy=True)(_plain_add)
    assert decorated is _plain_add
    assert get_remote_spec(decorated) == RemoteSpec(dispatch='all', collect=sum, lazy=True)
    assert get_remote_spec(Counter.add) == RemoteSpec(dispatch='slice', collect='mean', lazy=False)
    assert get_remote_spec(Counter.get) == RemoteSpec()
    assert Counter.add.__name__ == 'add' and Counter.__doc__ == 'A counter.'


def test_remote_class_behaves_like_the_plain_class():
    c = Counter(5, step=2, remote_group='default')
    assert type(c) is Counter and (c.value, c.step) == (5, 2)
    assert c.add(3) == 11 and c.get() == 11
    assert is_remote_class(Counter) and not is_remote_class(int)
    assert list(inspect.signature(Counter).parameters) == ['start', 'step']
    restored = pickle.loads(pickle.dumps(c))
    assert type(restored) is Counter and restored.value == 11
    with pytest.raises(TypeError):
        Counter(1, 2, 3)


def test_subclasses_accept_remote_group():
    child = Child('x', remote_group='default')
    assert (child.name, child.value, child.get()) == ('x', 10, -1)
    assert set(remote_methods(Child)) == {'add'}
    assert set(remote_methods(Counter)) == {'add', 'get'}


def test_construct_hook_places_objects_elsewhere():
    calls = []

    def hook(cls, group, args, kwargs):
        calls.append((cls, group, args, kwargs))
        return f'handle:{group}' if group == 'actors' else None

    remote.set_construct_hook(hook)
    try:
        assert Counter(1, step=3, remote_group='actors') == 'handle:actors'
        built_here = Counter(2, remote_group='other')
        assert type(built_here) is Counter and built_here.value == 2
        assert Counter(4).value == 4  # no remote_group: the hook is not consulted
    finally:
        remote.set_construct_hook(None)
    assert calls == [(Counter, 'actors', (1,), {'step': 3}), (Counter, 'other', (2,), {})]


def test_bad_declarations():
    with pytest.raises(ValueError, match="dispatch='scatter'"):
        remote_function(dispatch='scatter')
    with pytest.raises(ValueError, match="collect='max'"):
        remote_function(collect='max')
    with pytest.raises(TypeError, match='decorates classes'):
        remote_class(_plain_add)
