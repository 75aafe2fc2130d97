"""The benchmarks as modules, for tests of their functions."""

import importlib
from types import ModuleType


def load(name: str) -> ModuleType:
    """``benchmarks.<name>`` (``bench_train``), or a module named in full (``offline_gpu.runs``)."""
    return importlib.import_module(name if "." in name else f"benchmarks.{name}")
