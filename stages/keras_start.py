"""Keras for a stage process, imported without what no stage uses.

``from stages.keras_start import keras`` comes before any other import of
Keras in a stage that builds or loads a model (train, evaluate). When
installed, TensorFlow and Keras import at start some optional integrations,
each guarded by ``try: import ... except ImportError``: TensorFlow Lite's
JAX converter imports JAX, Keras' scikit-learn wrappers import
scikit-learn, its array slicing pandas (with pyarrow), its image-gallery
plots ``matplotlib.pyplot``. In a stage they only cost start-up time and
memory: about 2 s of each stage's 6.5-7 s import and 240 MiB of resident
memory on a 2-core VM (docs/benchmarks.md). They are made unimportable for
the time of Keras' own import, so those integrations see them missing;
right after, they import as usual (the evaluate stage's plots use
``matplotlib.pyplot``, MLflow uses pandas). JAX is left alone when Keras
runs on it, and nothing is left out when Keras was imported already.

On TensorFlow it also selects TensorFlow's pooling allocator for host
memory (``TF_CPU_ALLOCATOR_USE_BFC``, unless the environment sets it): by
default TensorFlow takes every tensor from ``malloc``, which maps the large
ones (a batch's activations: 115 MB for ``cifar10_cnn``'s first layer at
batch 500) afresh and returns them at each step, and the kernel zeroes their
pages anew each time. The pool keeps and reuses them: 9-13% less CPU time
an epoch for ``cifar10_cnn`` on a 2-core VM, the same numbers computed
(docs/benchmarks.md). It must be chosen before TensorFlow's first
allocation, so here.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ chatter; errors still raise
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")  # host memory pooled, not mapped afresh each step

#: imported by TensorFlow or Keras at start when installed, used by no stage through them
LEFT_OUT = ("sklearn", "pandas", "matplotlib.pyplot")


def backend_named() -> str | None:
    """The backend Keras will load, as Keras chooses it: ``KERAS_BACKEND``,
    else ``backend`` in ``$KERAS_HOME/keras.json`` (``~/.keras``), else
    TensorFlow; None when the config file cannot be read."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    config = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "keras.json"
    try:
        return json.loads(config.read_text()).get("backend", "tensorflow") if config.exists() else "tensorflow"
    except (OSError, ValueError, AttributeError):
        return None


def left_out() -> tuple[str, ...]:
    """The modules Keras' import goes without: :data:`LEFT_OUT`, and JAX
    unless Keras is to run on it."""
    return LEFT_OUT + (("jax",) if backend_named() == "tensorflow" else ())


@contextmanager
def unimportable(names: tuple[str, ...]) -> Iterator[None]:
    """Within the block, ``import`` of each of ``names`` not yet imported
    raises ImportError (a None entry in ``sys.modules``); afterwards they
    import as usual."""
    blocked = [name for name in names if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None
    try:
        yield
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def import_keras():
    """Keras, imported without :func:`left_out`'s modules if this is its first import."""
    if "keras" not in sys.modules:
        with unimportable(left_out()):
            import keras  # noqa: F401
    return sys.modules["keras"]


keras = import_keras()
