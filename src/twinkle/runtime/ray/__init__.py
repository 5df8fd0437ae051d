"""Ray mode: components placed on named device groups, driven from one script.

``twinkle.initialize(mode='ray', groups=[DeviceGroup(...)], global_device_mesh=...)`` starts (or
joins) Ray and reserves the groups; then ``TransformersModel(..., remote_group='default')`` builds
one actor per rank of that group and returns a :class:`RemoteHandle` whose methods dispatch and
collect as their ``@remote_function`` declarations say. ``twinkle.runtime.shutdown()`` (also run at
exit) tears everything down.
"""
from twinkle.runtime.ray.cluster import construct, handles, init_ray, shutdown
from twinkle.runtime.ray.handle import LazyResult, RemoteError, RemoteHandle, RemoteMethod, WorkerError

__all__ = ['init_ray', 'shutdown', 'construct', 'handles', 'RemoteHandle', 'RemoteMethod', 'RemoteError',
           'WorkerError', 'LazyResult']
