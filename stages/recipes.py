"""Training parts beyond plain ``compile(optimizer="adam")``: learning-rate
schedules, a label-smoothed sparse cross-entropy, a per-image PSNR loss and
a random-shift augmentation layer.

Written with ``keras.ops`` only, so they run on TensorFlow and JAX alike, and
registered as Keras serializables, so a saved model (and a checkpoint, with
its optimizer state) loads again wherever ``stages.recipes`` is imported.
"""

from __future__ import annotations

import math

import keras
from keras import ops

PACKAGE = "imagepipe"


@keras.saving.register_keras_serializable(package=PACKAGE)
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from ``peak / div`` to ``peak`` over the first ``warmup``
    fraction of ``total_steps``, then linear decay to ``peak / final_div``
    (the one-cycle policy of the fast CIFAR-10 training recipes)."""

    def __init__(self, peak: float, total_steps: int, warmup: float = 0.25, div: float = 25.0,
                 final_div: float = 1e3):
        self.peak, self.total_steps, self.warmup = float(peak), int(total_steps), float(warmup)
        self.div, self.final_div = float(div), float(final_div)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        up = max(self.warmup * self.total_steps, 1.0)
        down = max(self.total_steps - up, 1.0)
        start, end = self.peak / self.div, self.peak / self.final_div
        rising = start + (self.peak - start) * step / up
        falling = self.peak + (end - self.peak) * ops.minimum((step - up) / down, 1.0)
        return ops.where(step < up, rising, falling)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup": self.warmup, "div": self.div,
                "final_div": self.final_div}


@keras.saving.register_keras_serializable(package=PACKAGE)
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``peak`` over ``warmup`` of the steps, then cosine decay to 0."""

    def __init__(self, peak: float, total_steps: int, warmup: float = 0.05):
        self.peak, self.total_steps, self.warmup = float(peak), int(total_steps), float(warmup)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        up = max(self.warmup * self.total_steps, 1.0)
        down = max(self.total_steps - up, 1.0)
        progress = ops.clip((step - up) / down, 0.0, 1.0)
        cosine = 0.5 * self.peak * (1.0 + ops.cos(math.pi * progress))
        return ops.where(step < up, self.peak * (step + 1.0) / up, cosine)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup": self.warmup}


@keras.saving.register_keras_serializable(package=PACKAGE)
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of probabilities against integer labels smoothed by
    ``smoothing``: the true class gets ``1 - smoothing + smoothing / classes``,
    every other class ``smoothing / classes`` (Keras' sparse cross-entropy has
    no label smoothing)."""

    def __init__(self, smoothing: float = 0.1, num_classes: int = 10, name: str = "smoothed_sparse_crossentropy",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        self.smoothing, self.num_classes = float(smoothing), int(num_classes)

    def call(self, y_true, y_pred):
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        target = ops.one_hot(labels, self.num_classes) * (1.0 - self.smoothing) + self.smoothing / self.num_classes
        return keras.losses.categorical_crossentropy(target, ops.cast(y_pred, "float32"))

    def get_config(self):
        return {**super().get_config(), "smoothing": self.smoothing, "num_classes": self.num_classes}


@keras.saving.register_keras_serializable(package=PACKAGE)
class NegativePsnr(keras.losses.Loss):
    """Minus each image's PSNR in dB (values in [0, 1], MSE floored at
    ``floor``), averaged over the batch: minimizing it maximizes the mean
    per-image PSNR that evaluate reports.

    The gradient of ``10 log10(mse_i)`` is that of ``mse_i`` divided by
    ``mse_i``: MSE lets the images with the largest errors set the direction,
    this gives every image the same say in relative terms: a model cannot buy
    a lower pooled error on the images it gets most wrong (strongly coloured
    ones, for a colorizer) with small errors added to the images it gets
    nearly right (nearly grey ones), which cost those images the most dB."""

    def __init__(self, floor: float = 1e-10, name: str = "negative_psnr", **kwargs):
        super().__init__(name=name, **kwargs)
        self.floor = float(floor)

    def call(self, y_true, y_pred):
        diff = ops.cast(y_pred, "float32") - ops.cast(y_true, "float32")
        mse = ops.mean(ops.reshape(ops.square(diff), (ops.shape(diff)[0], -1)), axis=1)
        return (10.0 / math.log(10.0)) * ops.log(ops.maximum(mse, self.floor))

    def get_config(self):
        return {**super().get_config(), "floor": self.floor}


def schedule(kind: str, peak: float, total_steps: int, warmup: float | None):
    """The learning rate for ``optimizer.learning_rate``: a constant or a schedule."""
    if kind == "constant":
        return peak
    if kind == "one_cycle":
        return OneCycle(peak, total_steps, 0.25 if warmup is None else warmup)
    if kind == "cosine":
        return WarmupCosine(peak, total_steps, 0.05 if warmup is None else warmup)
    raise ValueError(f"unknown schedule {kind!r}")


@keras.saving.register_keras_serializable(package=PACKAGE)
class RandomShift(keras.layers.Layer):
    """Shifts each image by a whole number of pixels, up to ``max_shift`` in
    each direction and axis, the uncovered border zero: a padded random crop.
    Only in training. Written with ``keras.ops`` alone (each shift is a product
    with a 0/1 matrix), so the train step stays one compiled XLA program;
    Keras' ``RandomTranslation`` is not XLA-compatible, and one such layer makes
    Keras run the whole step op by op (a ResNet-9 epoch on an H200: 33-43 s).
    Computed in float32 whatever the policy, so the pixels move unchanged."""

    def __init__(self, max_shift: int, seed: int | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.max_shift, self.seed = int(max_shift), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _shift_matrices(self, batch, size: int):
        """(batch, size, size): row ``i`` picks source pixel ``i - shift``, or none."""
        shift = keras.random.randint((batch, 1, 1), -self.max_shift, self.max_shift + 1,
                                     seed=self.seed_generator)
        index = ops.arange(size)
        return ops.cast(ops.equal(index[None, None, :], index[None, :, None] - shift), self.compute_dtype)

    def call(self, images, training=False):
        if not training or not self.max_shift:
            return images
        batch = ops.shape(images)[0]
        rows = self._shift_matrices(batch, images.shape[1])
        cols = self._shift_matrices(batch, images.shape[2])
        shifted = ops.einsum("bij,bjwc->biwc", rows, images)
        return ops.einsum("bkw,biwc->bikc", cols, shifted)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "max_shift": self.max_shift, "seed": self.seed}
