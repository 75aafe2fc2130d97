"""The batches ``model.fit`` trains on, made from the uint8 arrays on demand.

:class:`ScaledBatches` defines them (which rows, in which order, scaled how)
and feeds every backend; on TensorFlow :func:`tf_batches` makes the same
batches, bit for bit, inside a ``tf.data`` pipeline (:func:`for_fit` picks).
"""

from __future__ import annotations

import keras
import numpy as np

from stages import distribution
from stages.experiment_data import Arrays
from stages.images import UNIT_SCALE, to_unit_float


class ScaledBatches(keras.utils.PyDataset):
    """The batches of ``arrays``, each gathered from the uint8 arrays and
    scaled to float32 in [0, 1] when Keras asks for it: an epoch never holds
    more than one batch (and the prefetched ones) as floats. Targets are
    scaled too when they are images (an autoencoder's). The arrays may be
    NumPy or, with ``training.data_on_device``, backend tensors on the
    accelerator (:func:`on_device`): batches are then made there.

    With ``seed`` (training) the batches are endless and each one's place is
    a pure function of its index: batch *i* is batch ``i % per_epoch`` of
    epoch ``epoch + i // per_epoch``, which visits the images in the
    permutation seeded from ``(seed, epoch)``. ``fit`` is given
    ``steps_per_epoch=per_epoch``, so Keras keeps one iterator for the whole
    training instead of one per epoch (on TensorFlow, ending a ``tf.data``
    iterator waits for its autotuning thread: about 10 s at some epochs,
    once at the end instead; docs/benchmarks.md), and prefetching across an
    epoch's end draws the next epoch's batches, as an uninterrupted or
    resumed run does. Each call into the backend must then end on an
    epoch's end: :func:`stages.training.execution_steps`. Without ``seed``
    (validation): one epoch, in order.

    Data-parallel (``placement``): the order is cut so that the last batch
    splits over the devices, and a process of several yields only its share
    of each batch (:class:`stages.distribution.Placement`)."""

    def __init__(self, arrays: Arrays, batch_size: int, image_targets: bool, seed: int | None = None,
                 epoch: int = 0, placement: distribution.Placement = distribution.ONE):
        super().__init__()
        self.arrays, self.batch_size, self.image_targets = arrays, batch_size, image_targets
        self.seed, self.epoch, self.placement = seed, epoch, placement
        self.rows = placement.usable_rows(len(arrays), batch_size)
        self.per_epoch = placement.batches(len(arrays), batch_size)
        self._orders: dict[int, np.ndarray] = {}  # the last two epochs drawn from (prefetching crosses ends)
        self._spare = None  # a batch to answer prefetching after release()

    def order(self, epoch: int) -> np.ndarray:
        """The rows of ``epoch`` in the order it visits them."""
        if self.seed is None:
            epoch = 0
        if epoch not in self._orders:
            count = len(self.arrays)
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = (np.arange(self.rows) if self.seed is None else
                                   np.random.default_rng([self.seed, epoch]).permutation(count)[:self.rows])
        return self._orders[epoch]

    def __len__(self) -> int:
        return self.per_epoch

    @property
    def num_batches(self) -> int | None:
        return None if self.seed is not None else self.per_epoch

    def release(self) -> None:
        """Let go of the arrays and the orders once ``fit`` is done with them.
        Keras on TensorFlow feeds a PyDataset through ``tf.data``'s
        ``from_generator``, whose generator TensorFlow keeps for the rest of
        the process: the images would stay alive with it. A prefetch after
        the last epoch (never trained on) gets a copy of the first batch."""
        if self.arrays is not None and self.seed is not None:
            self._spare = self[0]
        self.arrays, self._orders = None, {}

    def __getitem__(self, index: int):
        if self.arrays is None:
            if self._spare is None:
                raise RuntimeError("the batches were released")
            return self._spare
        epoch, step = divmod(index, self.per_epoch)
        order = self.order(self.epoch + epoch)
        rows = self.placement.share(order[step * self.batch_size:(step + 1) * self.batch_size])
        return scaled_batch(self.arrays.x, self.arrays.y, rows, self.image_targets)


def scaled_batch(x, y, rows, image_targets: bool) -> tuple:
    """The batch of ``rows``: inputs scaled, targets scaled when they are
    images; NumPy arrays, or backend tensors (rows may then be symbolic, as
    in a ``tf.data`` map)."""
    images = gather_scaled(x, rows)
    if y is x:  # an autoencoder reconstructing its input: one gather, not two
        return images, images
    return images, gather_scaled(y, rows) if image_targets else gather(y, rows)


def fit_data(train: Arrays, val: Arrays, batch_size: int, image_targets: bool, seed: int | None, start: int,
             epochs: int, placement: distribution.Placement = distribution.ONE, data_on_device: bool = False):
    """``model.fit``'s training and validation data (:func:`for_fit`; first
    copied to the device with ``data_on_device``) and what to let go of once
    fit is done with them (each has ``release()``). On TensorFlow, which
    holds its own copy, the arrays (``train`` and ``val`` too) are let go at once."""
    given = (train, val)
    if data_on_device:
        train, val = on_device(train), on_device(val)
    batches = for_fit(train, batch_size, image_targets, seed, start, epochs, placement)
    validation = for_fit(val, batch_size, image_targets, placement=placement)
    holders = (*given, train, val)
    if isinstance(batches, ScaledBatches):
        return batches, validation, (batches, validation, *holders)
    for arrays in holders:
        arrays.release()
    return batches, validation, ()


def for_fit(arrays: Arrays, batch_size: int, image_targets: bool, seed: int | None = None, epoch: int = 0,
            epochs: int | None = None, placement: distribution.Placement = distribution.ONE):
    """What ``model.fit`` is given for ``arrays``: with ``seed``, the training
    batches of epochs ``epoch`` to ``epochs - 1``; without, the validation
    batches. On TensorFlow :func:`tf_batches`, elsewhere :class:`ScaledBatches`."""
    if keras.backend.backend() == "tensorflow" and placement.processes == 1:
        return tf_batches(arrays, batch_size, image_targets, seed, epoch, epochs)
    return ScaledBatches(arrays, batch_size, image_targets, seed, epoch, placement)


def tf_batches(arrays: Arrays, batch_size: int, image_targets: bool, seed: int | None = None, epoch: int = 0,
               epochs: int | None = None):
    """The batches of :class:`ScaledBatches` (training ones, from ``epoch`` to
    ``epochs - 1``, with ``seed``; one epoch in order without), made by a
    ``tf.data`` pipeline that gathers the rows from uint8 tensors and scales
    them with the same float32 product. Keras on TensorFlow feeds a
    ``PyDataset`` through ``tf.data``'s ``from_generator``, which cost about
    0.1 s of both cores per batch (``cifar10_cnn``: 12% more CPU an epoch
    than the seed's arrays; docs/benchmarks.md); here no Python runs per
    batch. TensorFlow holds its own copy of the images (the caller may let
    its arrays go) and the order of every epoch as int32 rows, computed up
    front by :meth:`ScaledBatches.order`. The autotuner is off (a fixed
    prefetch of two batches): ending its iterator then waits for nothing."""
    import tensorflow as tf

    source = ScaledBatches(arrays, batch_size, image_targets, seed, epoch)
    last = epochs if seed is not None else epoch + 1
    epochs_orders = [source.order(e) for e in range(epoch, last)]  # none when resuming after the last epoch
    orders = np.array(epochs_orders, np.int32).reshape(len(epochs_orders), source.rows)
    x = tf.convert_to_tensor(arrays.x)
    y = x if arrays.y is arrays.x else tf.convert_to_tensor(arrays.y)

    options = tf.data.Options()
    options.autotune.enabled = False
    options.deterministic = True
    if seed is None:  # one epoch, its batches counted: Keras knows where validation ends
        rows = tf.data.Dataset.from_tensor_slices(orders[0]).batch(batch_size)
    else:
        epochs_rows = tf.data.Dataset.from_tensor_slices(orders)
        rows = epochs_rows.flat_map(lambda order: tf.data.Dataset.from_tensor_slices(order).batch(batch_size))
    return rows.map(lambda batch: scaled_batch(x, y, batch, image_targets)).prefetch(2).with_options(options)


def gather(array, rows: np.ndarray):
    """``array[rows]``, for a NumPy array or a backend tensor (``on_device``)."""
    return array[rows] if isinstance(array, np.ndarray) else keras.ops.take(array, rows, axis=0)


def gather_scaled(images, rows: np.ndarray):
    """``to_unit_float(images[rows])``; for uint8 images held by the backend
    (on the device, see ``on_device``, or in :func:`tf_batches`' pipeline)
    gathered and scaled there, with the same float32 product, so the batch
    is bit for bit the same."""
    if isinstance(images, np.ndarray):
        return to_unit_float(images[rows])
    return keras.ops.multiply(keras.ops.cast(gather(images, rows), "float32"), UNIT_SCALE)


def on_device(arrays: Arrays) -> Arrays:
    """``arrays`` copied once to the default device (the accelerator if there
    is one) as backend tensors of the same dtypes; an array that is both
    input and target stays one tensor."""
    x = keras.ops.convert_to_tensor(arrays.x)
    y = x if arrays.y is arrays.x else keras.ops.convert_to_tensor(arrays.y)
    return Arrays(x, y)
