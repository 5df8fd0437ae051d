"""The driver-side handle of a component placed on a device group (one actor per rank).

``handle.method(...)`` dispatches the inputs to the ranks as the method's ``@remote_function``
declaration says, runs the method on every rank at once, and collects the results. Methods
without a declaration run on every rank and return rank 0's result; plain attributes (and
``len`` / indexing) are read from rank 0.

Failures never hang the driver: as soon as one rank fails, the others get ``failure_grace_s`` to
finish (they may be blocked in a collective waiting for the failed one). If they do not, or if an
actor process died, the component is broken: its actors are killed and every later call raises.
"""
from __future__ import annotations

import inspect
import re
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from twinkle.errors import RemoteError
from twinkle.mesh import DeviceMesh
from twinkle.runtime.ray import collect as collect_mod
from twinkle.runtime.ray.worker import _DONE, SELF
from twinkle.runtime.remote import RemoteSpec, remote_methods

_ANSI = re.compile(r'\x1b\[[0-9;]*m')  # Ray colours its traceback header
DEFAULT_SPEC = RemoteSpec(dispatch='all', collect='first', lazy=False)
_POLL_S = 1.0


class WorkerError(RemoteError):
    """A remote component's method failed on some rank (its traceback is part of the message)."""

    def __init__(self, message: str, *, group: str, rank: Optional[int], method: str,
                 cause: Optional[BaseException] = None, remote_traceback: str = '') -> None:
        super().__init__(message)
        self.group, self.rank, self.method = group, rank, method
        self.cause, self.remote_traceback = cause, remote_traceback


class LazyResult:
    """A call in flight on every rank of a component. ``result()`` waits and collects (once)."""

    def __init__(self, handle: 'RemoteHandle', method: str, refs: List[Any],
                 finish: Callable[[List[Any]], Any]) -> None:
        self._handle, self._method, self.refs, self._finish = handle, method, refs, finish
        self._value: Any = None
        self._done = False

    def done(self) -> bool:
        import ray
        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        return self._done or len(ready) == len(self.refs)

    def result(self) -> Any:
        if not self._done:
            self._value = self._finish(self._handle._wait(self.refs, self._method))
            self._done = True
        return self._value

    def __repr__(self) -> str:
        return f'LazyResult({self._handle._tw_cls.__name__}.{self._method}, done={self.done()})'


class RemoteMethod:
    def __init__(self, handle: 'RemoteHandle', name: str, spec: RemoteSpec) -> None:
        self._handle, self._name, self.spec = handle, name, spec

    def submit(self, *args: Any, **kwargs: Any) -> LazyResult:
        """Start the call on every rank and return at once, whatever the declaration says."""
        h = self._handle
        h._check_usable(self._name)
        if self.spec.dispatch == 'slice':
            per_rank = collect_mod.slice_inputs(args, kwargs, h._tw_mesh, f'{h._tw_cls.__name__}.{self._name}')
        else:
            per_rank = [(args, kwargs)] * len(h._tw_actors)
        refs = [actor.call.remote(self._name, a, k) for actor, (a, k) in zip(h._tw_actors, per_rank)]

        def finish(results: List[Any]) -> Any:
            value = collect_mod.collect(results, self.spec.collect, h._tw_mesh, self.spec.dispatch)
            return h if isinstance(value, str) and value == SELF else value

        return LazyResult(h, self._name, refs, finish)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        pending = self.submit(*args, **kwargs)
        return pending if self.spec.lazy else pending.result()

    def __repr__(self) -> str:
        return f'<remote {self._handle._tw_cls.__name__}.{self._name} {self.spec}>'


class RemoteHandle:
    """Stands for a ``remote_class`` component on the driver; see the module docstring."""

    def __init__(self, cls: type, group: str, actors: Sequence[Any], mesh: DeviceMesh,
                 failure_grace_s: float = 10.0) -> None:
        self._tw_cls = cls
        self._tw_group = group
        self._tw_actors = list(actors)
        self._tw_mesh = mesh
        self._tw_specs: Dict[str, RemoteSpec] = remote_methods(cls)
        self._tw_grace = failure_grace_s
        self._tw_broken: Optional[str] = None

    # ------------------------------------------------------------------ attribute access
    def __getattr__(self, name: str) -> Any:
        if name.startswith('__') or name.startswith('_tw_'):
            raise AttributeError(name)
        attr = inspect.getattr_static(self._tw_cls, name, None)
        if isinstance(attr, (staticmethod, classmethod)) or inspect.isfunction(attr):
            return RemoteMethod(self, name, self._tw_specs.get(name, DEFAULT_SPEC))
        return self._rank0('get', name)

    def _rank0(self, kind: str, name: str, *args: Any) -> Any:
        self._check_usable(name)
        actor = self._tw_actors[0]
        ref = actor.get.remote(name) if kind == 'get' else actor.call.remote(name, args, {})
        value = self._wait([ref], name, ranks=[0], attribute=kind == 'get')[0]
        return self if isinstance(value, str) and value == SELF else value

    def __len__(self) -> int:
        return self._rank0('call', '__len__')

    def __getitem__(self, index: Any) -> Any:
        return self._rank0('call', '__getitem__', index)

    def __iter__(self) -> Iterator[Any]:
        self._check_usable('__iter__')
        self._wait([a.iter_start.remote() for a in self._tw_actors], '__iter__')
        while True:
            self._check_usable('__next__')
            items = self._wait([a.iter_next.remote() for a in self._tw_actors], '__next__')
            if isinstance(items[0], str) and items[0] == _DONE:
                return
            yield items[0]

    def __repr__(self) -> str:
        state = f', broken: {self._tw_broken.splitlines()[0]}' if self._tw_broken else ''
        return (f'RemoteHandle({self._tw_cls.__name__} on group {self._tw_group!r}, '
                f'{len(self._tw_actors)} rank(s), {self._tw_mesh!r}{state})')

    # ------------------------------------------------------------------ waiting and failures
    def _check_usable(self, method: str) -> None:
        if self._tw_broken is not None:
            raise WorkerError(f'{self._tw_cls.__name__} on group {self._tw_group!r} is no longer usable, so '
                              f'{method}() cannot run: {self._tw_broken}', group=self._tw_group, rank=None,
                              method=method)

    def _wait(self, refs: List[Any], method: str, ranks: Optional[List[int]] = None,
              attribute: bool = False) -> List[Any]:
        """Results of ``refs`` (one per rank); raise the first failure without waiting forever."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        ranks = ranks if ranks is not None else list(range(len(refs)))
        position = {ref: i for i, ref in enumerate(refs)}
        results: List[Any] = [None] * len(refs)
        pending = list(refs)
        failures: Dict[int, BaseException] = {}  # by rank
        died: List[int] = []
        deadline: Optional[float] = None
        while pending:
            timeout = _POLL_S if deadline is None else max(0.0, min(_POLL_S, deadline - time.monotonic()))
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=timeout)
            for ref in ready:
                i = position[ref]
                try:
                    results[i] = ray.get(ref)
                except RayTaskError as exc:
                    failures[ranks[i]] = self._task_error(exc, ranks[i], method, attribute)
                except RayActorError as exc:
                    died.append(ranks[i])
                    failures[ranks[i]] = self._died_error(exc, ranks[i], method)
            if failures and deadline is None:
                deadline = time.monotonic() + (0.0 if died else self._tw_grace)
            if pending and deadline is not None and time.monotonic() >= deadline:
                failure = failures[min(died) if died else min(failures)]
                stuck = sorted(ranks[position[r]] for r in pending)
                self._break(f'{failure} (rank(s) {stuck} did not finish within {self._tw_grace:g}s after it)')
                raise failure
        if failures:
            # The lowest failed rank, so the report does not depend on which rank was quicker to fail.
            failure = failures[min(died) if died else min(failures)]
            if died:
                self._break(str(failure))
            raise failure
        return results

    def _task_error(self, exc: Any, rank: int, method: str, attribute: bool) -> BaseException:
        cause = getattr(exc, 'cause', None)
        tb = _ANSI.sub('', getattr(exc, 'traceback_str', '') or str(exc))
        tb = '\n'.join(line for line in tb.splitlines() if line.strip(' ^'))  # drop Ray's caret-only lines
        where = f'{self._tw_cls.__name__}.{method}'
        if attribute and isinstance(cause, AttributeError):
            return AttributeError(f'{where}: {cause} (read from rank 0 of group {self._tw_group!r})')
        return WorkerError(f'{where} failed on rank {rank} of group {self._tw_group!r} with '
                          f'{type(cause).__name__ if cause is not None else "an error"}: {cause}\n'
                          f'--- remote traceback (rank {rank}) ---\n{tb.rstrip()}',
                          group=self._tw_group, rank=rank, method=method, cause=cause, remote_traceback=tb)

    def _died_error(self, exc: Any, rank: int, method: str) -> WorkerError:
        return WorkerError(f'rank {rank} of group {self._tw_group!r} ({self._tw_cls.__name__}) died during '
                          f'{method}(): its process exited (crash, os._exit, out of memory or killed). '
                          f'Ray says: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}',
                          group=self._tw_group, rank=rank, method=method, cause=exc)

    def _break(self, reason: str) -> None:
        """Kill every actor of this component: its process group lost a member and cannot recover."""
        import ray
        self._tw_broken = reason.splitlines()[0] if reason else 'a rank failed'
        for actor in self._tw_actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass

    def _tw_teardown(self, timeout_s: float) -> None:
        """Release the component on every rank and leave its process group; then end the actors."""
        import ray
        if self._tw_broken is None and self._tw_actors:
            refs = [a.teardown.remote() for a in self._tw_actors]
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        self._break(self._tw_broken or 'shut down')
