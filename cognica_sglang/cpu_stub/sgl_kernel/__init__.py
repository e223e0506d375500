"""Stand-in for `sgl_kernel` on a machine without CUDA: see `cognica_sglang.cpu_stub` (`cognica sglang-cpu-path`).

Its parent folder goes first on PYTHONPATH on a CPU only: every name (and submodule) resolves to a stub that raises if
it is ever called, so an SGLang code path that needs a real kernel fails loudly instead of computing something wrong.
The pure-Python submodules SGLang reads at import (`scalar_type`) come from the real wheel.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

_PURE_PYTHON = ("scalar_type",)
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REAL = importlib.machinery.PathFinder.find_spec(
    "sgl_kernel", [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
)

__version__ = "0.0.0+cpu-stub"


def _missing(name):
    def stub(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel stand-in: {name} has no CPU implementation in the stand-in")

    stub.__name__ = name.rsplit(".", 1)[-1]
    return stub


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(f"sgl_kernel.{name}")


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(f"{self.__name__}.{name}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves any `sgl_kernel.<sub>` import as a stub module."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(__name__ + "."):
            return None
        sub = fullname[len(__name__) + 1:]
        if sub in _PURE_PYTHON and _REAL is not None:
            real_dir = _REAL.submodule_search_locations[0]
            return importlib.util.spec_from_file_location(fullname, os.path.join(real_dir, sub + ".py"))
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _StubFinder())
