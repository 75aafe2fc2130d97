"""The batches ``model.fit`` trains on, made from the uint8 arrays on demand."""

from __future__ import annotations

import math

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

    With ``seed``, epoch *e* visits the images in the permutation seeded from
    ``(seed, e)``, so a run resumed at any epoch sees the batches an
    uninterrupted one does; without it, in their order (validation). ``fit``
    names the epoch through :class:`EpochOrder`: Keras calls the dataset's own
    ``on_epoch_end`` also once when ``fit`` starts (after reading two batches
    for their shapes), so counting its calls would train epoch *e* on the
    order of *e + 1*.

    Data-parallel (``placement``): the order is cut so that the last batch
    splits over the devices, and a process of several yields only its share
    of each batch (:class:`stages.distribution.Placement`)."""

    def __init__(self, arrays: Arrays, batch_size: int, image_targets: bool, seed: int | None = None,
                 epoch: int = 0, placement: distribution.Placement = distribution.ONE):
        super().__init__()
        self.arrays, self.batch_size, self.image_targets = arrays, batch_size, image_targets
        self.seed, self.epoch, self.placement = seed, epoch, placement
        self.rows = placement.usable_rows(len(arrays), batch_size)
        self.order = self._order()

    def _order(self) -> np.ndarray:
        count = len(self.arrays)
        if self.seed is None:
            order = np.arange(count)
        else:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(count)
        return order[:self.rows]

    def start_epoch(self, epoch: int) -> None:
        if self.seed is not None and epoch != self.epoch:
            self.epoch = epoch
            self.order = self._order()

    def __len__(self) -> int:
        return math.ceil(self.rows / self.batch_size)

    def release(self) -> None:
        """Let go of the arrays and the order once ``fit`` is done with them.
        Keras on TensorFlow feeds a PyDataset through ``tf.data``'s
        ``from_generator``, whose generator TensorFlow keeps for the rest of
        the process: the images would stay alive with it."""
        self.arrays = self.order = None

    def __getitem__(self, index: int):
        rows = self.placement.share(self.order[index * self.batch_size:(index + 1) * self.batch_size])
        x = gather_scaled(self.arrays.x, rows)
        if self.arrays.y is self.arrays.x:  # an autoencoder reconstructing its input: one gather, not two
            return x, x
        if self.image_targets:
            return x, gather_scaled(self.arrays.y, rows)
        return x, gather(self.arrays.y, rows)


class EpochOrder(keras.callbacks.Callback):
    """Gives ``batches`` the epoch that is starting, before Keras draws its
    first batch (its iterators over a PyDataset, and TensorFlow's prefetching
    of one, draw nothing before that)."""

    def __init__(self, batches: ScaledBatches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.start_epoch(epoch)


def gather(array, rows: np.ndarray):
    """``array[rows]``, for a NumPy array or a backend tensor (``on_device``)."""
    return array[rows] if isinstance(array, np.ndarray) else keras.ops.take(array, rows, axis=0)


def gather_scaled(images, rows: np.ndarray):
    """``to_unit_float(images[rows])``; for uint8 images already on the
    device (a backend tensor, see ``on_device``) gathered and scaled there,
    with the same float32 product, so the batch is bit for bit the same."""
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
