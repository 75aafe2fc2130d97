"""Data-parallel training through the backend's own engine (``training.distribution``).

``none`` (the default) trains on one device. ``data_parallel`` replicates the
model on every visible device of one kind (the GPUs, or else the CPU devices)
and splits each batch across them; ``training.batch_size`` stays the global
batch, so the same params give the same optimisation as on one device, up to
floating-point reduction order.

* Keras on JAX: ``keras.distribution.DataParallel`` over
  ``keras.distribution.list_devices()``. Every batch is sharded over the
  devices, so its rows must split evenly: the last batch of an epoch drops
  up to ``devices - 1`` images (:meth:`Placement.usable_rows`). Several
  processes (hosts) join through ``keras.distribution.initialize()``
  (``jax.distributed``) when ``KERAS_DISTRIBUTION_JOB_ADDRESSES`` and
  ``KERAS_DISTRIBUTION_NUM_PROCESSES`` are set (and
  ``KERAS_DISTRIBUTION_PROCESS_ID`` on each host): each process then feeds
  its own share of every global batch (:class:`Placement`), and only process
  0 writes the model, the checkpoints and the MLflow run.
* Keras on TensorFlow: ``tf.distribute.MirroredStrategy`` over the devices
  of one host. Several workers (``TF_CONFIG``) are refused with a clear
  error: Keras 3's ``Model.fit`` fails under ``MultiWorkerMirroredStrategy``
  (keras-team/keras#20585; seen here with Keras 3.15.1, TensorFlow 2.21.0).

``IMAGEPIPE_CPU_DEVICES=N`` splits the host CPU into N devices (TensorFlow
logical devices; XLA's host platform device count on JAX), so data-parallel
training runs, and is tested, on a machine without accelerators. It must be
set before the backend starts, which :func:`setup` does first thing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

from stages.errors import PipelineError

log = logging.getLogger("stages.distribution")

CPU_DEVICES = "IMAGEPIPE_CPU_DEVICES"


def _cpu_devices() -> int:
    raw = os.environ.get(CPU_DEVICES, "")
    if not raw:
        return 0
    if not raw.isdigit() or int(raw) < 1:
        raise PipelineError(f"{CPU_DEVICES}={raw!r}: expected a whole number of CPU devices, 1 or more")
    return int(raw)


def prepare_devices() -> None:
    """Split the CPU into ``IMAGEPIPE_CPU_DEVICES`` devices, before the backend starts."""
    count = _cpu_devices()
    if count < 2:
        return
    import keras

    if keras.backend.backend() == "jax":
        flag = f"--xla_force_host_platform_device_count={count}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)


@dataclass(frozen=True)
class Placement:
    """Where one training runs: ``replicas`` devices in all, over ``processes``
    processes of which this one is ``index`` (0 is the chief, the one that
    writes). A batch's rows must split evenly into ``batch_multiple`` shares
    (JAX places a share on each device; TensorFlow's strategy splits uneven
    batches itself: 1)."""

    replicas: int = 1
    processes: int = 1
    index: int = 0
    batch_multiple: int = 1

    @property
    def chief(self) -> bool:
        return self.index == 0

    def usable_rows(self, count: int, batch_size: int) -> int:
        """How many of ``count`` rows an epoch uses when every batch must
        split into ``batch_multiple`` equal shares: the last, partial batch is
        cut to a multiple (``batch_size`` itself is one, see ``_check_batch``)."""
        return count - (count % batch_size) % self.batch_multiple

    def batches(self, count: int, batch_size: int) -> int:
        """The batches an epoch of ``count`` rows makes (:meth:`usable_rows`,
        the last one partial): what the feeder yields an epoch and the
        optimizer's schedule and the calls into the backend count on."""
        return math.ceil(self.usable_rows(count, batch_size) / batch_size)

    def share(self, rows):
        """This process's part of a global batch's ``rows`` (all of them in one process)."""
        size = len(rows) // self.processes
        return rows[self.index * size:(self.index + 1) * size]

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        """For what the chief does by itself (saving a model). Keras' saving
        creates a throwaway optimizer, whose variable under a JAX
        distribution of several processes is placed by a collective that the
        other processes never join (a hang); outside the distribution it is a
        local one. The model's own variables are read as they are (every
        process holds a full copy)."""
        if self.processes == 1:
            yield
            return
        import keras

        previous = keras.distribution.distribution()
        keras.distribution.set_distribution(None)
        try:
            yield
        finally:
            keras.distribution.set_distribution(previous)

    def agree(self, what: str, value: int | str) -> None:
        """Raise the same PipelineError in every process unless all of them
        hold the same ``value`` (one collective; nothing in one process)."""
        if self.processes == 1:
            return
        import numpy as np
        from jax.experimental import multihost_utils

        code = value if isinstance(value, int) else int.from_bytes(hashlib.sha256(value.encode()).digest()[:7], "big")
        codes = np.asarray(multihost_utils.process_allgather(np.array([code], dtype=np.int64))).reshape(-1)
        if len(set(codes.tolist())) > 1:
            shown = ", ".join(f"process {i}: {c if isinstance(value, int) else 'other'}"
                              for i, c in enumerate(codes.tolist()) if c != codes[0] or i == 0)
            raise PipelineError(f"{what} differs between the {self.processes} processes ({shown})")


ONE = Placement()


@contextlib.contextmanager
def setup(kind: str, batch_size: int, where: str) -> Iterator[Placement]:
    """Enter the distribution for building, training and saving a model; yields where it runs.

    ``where`` names the params key, for errors (``experiments.<name>.training``).
    """
    if kind == "none":
        _check_alone(where)
        yield ONE
        return
    prepare_devices()
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        if os.environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES"):
            keras.distribution.initialize()
        import jax

        devices = _jax_devices(keras)
        _check_batch(batch_size, len(devices), where)
        placement = Placement(len(devices), jax.process_count(), jax.process_index(), len(devices))
        previous = keras.distribution.distribution()
        # several processes: each feeds its own share of every batch (Placement.share), not a copy to shard
        keras.distribution.set_distribution(keras.distribution.DataParallel(
            devices=devices, auto_shard_dataset=placement.processes == 1))
        log.info("data-parallel over %d %s device(s) in %d process(es), this one %d (keras.distribution."
                 "DataParallel, JAX)", len(devices), devices[0].split(":")[0], placement.processes,
                 placement.index)
        try:
            yield placement
        finally:
            keras.distribution.set_distribution(previous)
    elif backend == "tensorflow":
        import tensorflow as tf

        if os.environ.get("TF_CONFIG"):
            raise PipelineError(
                f"{where}.distribution: several TensorFlow workers (TF_CONFIG is set) are not supported: Keras "
                "3's Model.fit fails under tf.distribute.MultiWorkerMirroredStrategy (keras-team/keras#20585); "
                "use KERAS_BACKEND=jax with KERAS_DISTRIBUTION_JOB_ADDRESSES, KERAS_DISTRIBUTION_NUM_PROCESSES "
                "and KERAS_DISTRIBUTION_PROCESS_ID on each host, or unset TF_CONFIG for this host's devices")
        logging.getLogger("tensorflow").setLevel(logging.WARNING)  # a line per reduction otherwise
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or \
                  [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
        _check_batch(batch_size, strategy.num_replicas_in_sync, where)
        log.info("data-parallel over %d replica(s) (tf.distribute.MirroredStrategy)", strategy.num_replicas_in_sync)
        with strategy.scope():
            yield Placement(strategy.num_replicas_in_sync)
    else:
        raise PipelineError(f"{where}.distribution: data_parallel is not supported on the {backend} backend "
                            "(use jax or tensorflow)")


def _check_alone(where: str) -> None:
    """A training on one device started as one of several processes (a
    launch over several hosts) would train alone in each and write from each."""
    raw = os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "")
    if raw.strip().isdigit() and int(raw) > 1:
        raise PipelineError(f"{where}.distribution: none, but this process is one of {int(raw)} "
                            f"(KERAS_DISTRIBUTION_NUM_PROCESSES={raw}): each would train the whole model and "
                            "write it; set distribution: data_parallel, or unset the KERAS_DISTRIBUTION_* "
                            "variables to train in one process")


def _jax_devices(keras) -> list[str]:
    try:
        gpus = keras.distribution.list_devices("gpu")
    except RuntimeError:  # JAX without a GPU platform
        gpus = []
    return gpus or keras.distribution.list_devices("cpu")


def _check_batch(batch_size: int, replicas: int, where: str) -> None:
    if batch_size % replicas:
        raise PipelineError(f"{where}.batch_size: {batch_size} does not split evenly over {replicas} devices; "
                            f"use a multiple of {replicas}")


def device_peak_mib() -> float | None:
    """The most accelerator memory this process has held so far, in MiB, on
    the busiest device (JAX's allocator statistics); None on a CPU or a
    backend that does not report it."""
    import keras

    if keras.backend.backend() != "jax":
        return None
    import jax

    peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use") for device in jax.local_devices()
             if device.platform != "cpu"]
    peaks = [peak for peak in peaks if peak is not None]
    return max(peaks) / 2**20 if peaks else None
