"""What the train stage sets up before ``fit``: the backend, the compiled
model with its optimizer and loss, and the number of epochs."""

from __future__ import annotations

import keras
import numpy as np

from stages import metrics, recipes
from stages.errors import PipelineError
from stages.experiment_params import Experiment, Training
from stages.models import LINEAR_ENCODER, build, init_linear_path

LOSSES = {"mse": "mean_squared_error", "bce": "binary_crossentropy",
          "sparse_categorical_crossentropy": "sparse_categorical_crossentropy"}


def configure_backend(seed: int, mixed_precision: bool) -> None:
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # the one backend switch: deterministic kernels on TF

        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if mixed_precision else "float32")


def epochs_for(exp: Experiment, limits) -> int:
    return min(exp.training.epochs, limits.max_epochs or exp.training.epochs)


def optimizer_for(t: Training, total_steps: int) -> keras.optimizers.Optimizer:
    """The optimizer ``training`` names, at its constant rate or on its schedule
    over ``total_steps``; unset options keep Keras' defaults."""
    options = {}
    if t.gradient_accumulation_steps:  # a schedule still counts every batch: total_steps are batches
        options["gradient_accumulation_steps"] = t.gradient_accumulation_steps
    if t.learning_rate is not None:
        options["learning_rate"] = recipes.schedule(t.schedule, t.learning_rate, total_steps, t.warmup)
    if t.optimizer == "sgd":
        options.update(momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay)
    elif t.optimizer == "adamw" and t.weight_decay is not None:
        options["weight_decay"] = t.weight_decay
    kinds = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW, "rmsprop": keras.optimizers.RMSprop,
             "sgd": keras.optimizers.SGD}
    return kinds[t.optimizer](**options)


def loss_for(t: Training, num_classes: int):
    if t.label_smoothing:
        return recipes.SmoothedSparseCrossentropy(t.label_smoothing, num_classes)
    if t.loss == "psnr":  # floored like evaluate's PSNR, so the loss is minus the figure it reports
        return recipes.NegativePsnr(metrics.MSE_FLOOR)
    return LOSSES[t.loss]


def execution_steps(wanted: int, per_epoch: int) -> int:
    """Batches per call into the backend for ``training.steps_per_execution``
    = ``wanted``: a divisor of the epoch's ``per_epoch`` batches, because with
    the endless training batches (:class:`stages.feeder.ScaledBatches`) a
    call that ran on past an epoch's end would train on the next epoch's
    first batches in this one. The largest divisor up to ``wanted``; where
    that is under half of it (211 batches an epoch have only 1 and 211), the
    smallest divisor above it. Both backends run a call's steps one batch at
    a time (TensorFlow in a graph loop, JAX from Python), so a large call
    costs no memory or compile time; only batch-level callbacks run less
    often. The same batches and updates either way."""
    divisors = [steps for steps in range(1, per_epoch + 1) if per_epoch % steps == 0]
    below = max(steps for steps in divisors if steps <= wanted)
    if 2 * below >= min(wanted, per_epoch):
        return below
    return next(steps for steps in divisors if steps > wanted)


def compiled_model(name: str, exp: Experiment, image_shape, num_classes: int, steps_per_epoch: int, epochs: int,
                   train_targets: np.ndarray | None = None) -> keras.Model:
    """The compiled model; a ``linear_path`` autoencoder starts from the PCA of
    ``train_targets`` (uint8), fitted on the same images as evaluate's baseline."""
    try:
        model = build(exp.model, image_shape, num_classes)
        if getattr(exp.model, "linear_path", False):
            if train_targets is None:
                raise ValueError("linear_path needs the training images to fit its PCA")
            mean, vectors = metrics.pca_fit(train_targets, model.get_layer(LINEAR_ENCODER).units)
            init_linear_path(model, mean, vectors)
    except ValueError as exc:  # the model does not fit these images (sizes known only after prepare)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"experiments.{name}.model does not fit {exp.data.input}'s "
                            f"{'x'.join(map(str, image_shape))} images: {first}") from None
    t = exp.training
    model.compile(optimizer=optimizer_for(t, steps_per_epoch * epochs), loss=loss_for(t, num_classes),
                  metrics=list(t.metrics), jit_compile=t.jit_compile,
                  steps_per_execution=execution_steps(t.steps_per_call, steps_per_epoch))
    return model
