"""Started on ``PYTHONPATH`` by tests/conftest.py when ``MATRIXINFER_TEST_PRETEND_GPU=1``: every child
Python process then sees ``torch.cuda.is_available()`` as True, as it would on a machine with a GPU.

A test that let any process pick its device by default would then try CUDA (which this CPU build
of torch lacks) and fail, as such tests failed on a real GPU machine.

The patch is applied when a process imports ``torch.cuda``, not by importing torch here: processes
that never use torch (EMS servers, the load generator) must start as fast as they do on a GPU box.
"""

import os
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec, PathFinder


class _GpuVisible(MetaPathFinder):
    """Finds ``torch.cuda`` as usual and makes its ``is_available`` answer True once it is loaded."""

    def find_spec(self, name, path, target=None) -> ModuleSpec | None:
        if name != "torch.cuda":
            return None
        sys.meta_path.remove(self)
        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module) -> None:
            load(module)
            module.is_available = lambda: True

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if os.environ.get("MATRIXINFER_TEST_PRETEND_GPU") == "1":
    if "torch.cuda" in sys.modules:
        sys.modules["torch.cuda"].is_available = lambda: True
    else:
        sys.meta_path.insert(0, _GpuVisible())
