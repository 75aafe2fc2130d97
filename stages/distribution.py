"""Data-parallel training through the backend's own engine (``training.distribution``).

``none`` (the default) trains on one device. ``data_parallel`` replicates the
model on every visible device of one kind (the GPUs, or else the CPU devices)
and splits each batch across them; ``training.batch_size`` stays the global
batch, so the same params give the same optimisation as on one device, up to
floating-point reduction order.

* Keras on JAX: ``keras.distribution.DataParallel`` over
  ``keras.distribution.list_devices()``; several hosts join through
  ``keras.distribution.initialize()`` (``jax.distributed``) when
  ``KERAS_DISTRIBUTION_JOB_ADDRESSES`` and ``KERAS_DISTRIBUTION_NUM_PROCESSES``
  are set (and ``KERAS_DISTRIBUTION_PROCESS_ID`` on each host).
* Keras on TensorFlow: ``tf.distribute.MirroredStrategy`` over the devices,
  or ``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` names a cluster.

``IMAGEPIPE_CPU_DEVICES=N`` splits the host CPU into N devices (TensorFlow
logical devices; XLA's host platform device count on JAX), so data-parallel
training runs, and is tested, on a machine without accelerators. It must be
set before the backend starts, which :func:`setup` does first thing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

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


@contextlib.contextmanager
def setup(kind: str, batch_size: int, where: str) -> Iterator[int]:
    """Enter the distribution for building, training and saving a model; yields the number of replicas.

    ``where`` names the params key, for errors (``experiments.<name>.training``).
    """
    if kind == "none":
        yield 1
        return
    prepare_devices()
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        if os.environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES"):
            keras.distribution.initialize()
        devices = _jax_devices(keras)
        _check_batch(batch_size, len(devices), where)
        previous = keras.distribution.distribution()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        log.info("data-parallel over %d %s device(s) (keras.distribution.DataParallel, JAX)", len(devices),
                 devices[0].split(":")[0])
        try:
            yield len(devices)
        finally:
            keras.distribution.set_distribution(previous)
    elif backend == "tensorflow":
        import tensorflow as tf

        logging.getLogger("tensorflow").setLevel(logging.WARNING)  # a line per reduction otherwise
        if os.environ.get("TF_CONFIG"):
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
            name = "MultiWorkerMirroredStrategy"
        else:
            devices = [d.name for d in tf.config.list_logical_devices("GPU")] or \
                      [d.name for d in tf.config.list_logical_devices("CPU")]
            strategy = tf.distribute.MirroredStrategy(devices)
            name = "MirroredStrategy"
        _check_batch(batch_size, strategy.num_replicas_in_sync, where)
        log.info("data-parallel over %d replica(s) (tf.distribute.%s)", strategy.num_replicas_in_sync, name)
        with strategy.scope():
            yield strategy.num_replicas_in_sync
    else:
        raise PipelineError(f"{where}.distribution: data_parallel is not supported on the {backend} backend "
                            "(use jax or tensorflow)")


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
