"""Build hooks of the thin client: ship only the modules ``import twinkle.client`` needs.

The packages listed in pyproject.toml also hold training modules (``twinkle/hub.py``, ``twinkle/runtime/local.py``
...) that import torch; they are left out, so the client cannot half-import them on a machine without torch.
"""
from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.egg_info import egg_info

# Every module of the distribution; tests/client/test_thin_install.py checks this is what the client imports.
CLIENT_MODULES = {
    'twinkle': ('__init__', 'device_group', 'errors', 'mesh', 'mesh_args', 'platform'),
    'twinkle.runtime': ('__init__', 'context', 'remote'),
    'twinkle.client': ('__init__', 'codec', 'http', 'methods', 'proxy'),
    'twinkle.wire': ('__init__', 'codec', 'methods'),
}


class ClientModules(build_py):

    def find_package_modules(self, package, package_dir):
        keep = CLIENT_MODULES.get(package, ())
        return [m for m in super().find_package_modules(package, package_dir) if m[1] in keep]


class LocalEggInfo(egg_info):
    # The sources live in ../../src; keep build metadata here rather than next to them.

    def initialize_options(self):
        super().initialize_options()
        self.egg_base = '.'


setup(cmdclass={'build_py': ClientModules, 'egg_info': LocalEggInfo})
