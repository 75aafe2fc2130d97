"""Keras model builders driven by params: conv autoencoders and CNN classifiers.

Functional models built from ``keras.layers`` only (no backend-specific
ops), so the same code runs on TensorFlow (the CPU default) and on JAX
(``KERAS_BACKEND=jax``, used on the GPU machine).

Autoencoder layout, as in the seed questions: level ``i`` of the encoder is a
3x3 conv with ``filters[i]``; the encoder pools after its first
``poolings - 1`` levels and after its last one (so removing one pooling from
the CIFAR-10 4-pool model drops the one after the third level, exactly as the
asker did); the decoder mirrors the filters and upsamples after its first
``poolings`` levels; a final 3x3 conv maps back to the image channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import layers


@dataclass(frozen=True)
class AutoencoderSpec:
    filters: tuple[int, ...]
    poolings: int
    activation: str = "relu"
    output_activation: str = "sigmoid"  # or "linear"
    kernel_size: int = 3


@dataclass(frozen=True)
class ConvBlock:
    filters: int
    kernel_size: int = 3
    activation: str | None = "relu"  # None: no activation (the colored-MNIST bug)
    padding: str = "same"
    pool: bool = True


@dataclass(frozen=True)
class ClassifierSpec:
    conv: tuple[ConvBlock, ...]
    num_classes: int = 10
    initializer: str = "glorot_uniform"  # for the conv kernels; dense layers keep Keras' default
    dense: tuple[int, ...] = ()
    dense_activation: str = "relu"
    dropout: float = 0.0
    logits_activation: str | None = None  # "relu": ReLU before softmax (the colored-MNIST bug)


def encoder_pools(spec: AutoencoderSpec) -> list[bool]:
    """Whether each encoder level is followed by a pooling."""
    levels = len(spec.filters)
    if not 0 <= spec.poolings <= levels:
        raise ValueError(f"poolings={spec.poolings} must be between 0 and the {levels} levels")
    return [i < spec.poolings - 1 or (i == levels - 1 and spec.poolings > 0) for i in range(levels)]


def latent_shape(spec: AutoencoderSpec, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The bottleneck's shape for ``image_shape``; error if the poolings do not divide it."""
    height, width, _ = image_shape
    factor = 2 ** spec.poolings
    if height % factor or width % factor:
        raise ValueError(
            f"{spec.poolings} poolings need image sides divisible by {factor}, got {height}x{width}"
        )
    return (height // factor, width // factor, spec.filters[-1])


def build_autoencoder(spec: AutoencoderSpec, image_shape: tuple[int, int, int], name: str = "autoencoder"):
    """Return (autoencoder, encoder) Keras models."""
    latent_shape(spec, image_shape)  # validates divisibility
    conv = dict(kernel_size=spec.kernel_size, activation=spec.activation, padding="same")
    inputs = keras.Input(shape=image_shape, name="image")
    x = inputs
    for level, (filters, pool) in enumerate(zip(spec.filters, encoder_pools(spec))):
        x = layers.Conv2D(filters, name=f"enc_conv{level}", **conv)(x)
        if pool:
            x = layers.MaxPooling2D(2, padding="same", name=f"enc_pool{level}")(x)
    latent = x
    for level, filters in enumerate(reversed(spec.filters)):
        x = layers.Conv2D(filters, name=f"dec_conv{level}", **conv)(x)
        if level < spec.poolings:
            x = layers.UpSampling2D(2, name=f"dec_up{level}")(x)
    outputs = layers.Conv2D(
        image_shape[2], spec.kernel_size, padding="same",
        activation=spec.output_activation, name="reconstruction", dtype="float32",
    )(x)
    return keras.Model(inputs, outputs, name=name), keras.Model(inputs, latent, name=f"{name}_encoder")


def build_classifier(spec: ClassifierSpec, image_shape: tuple[int, int, int], name: str = "classifier"):
    """A CNN: conv blocks, flatten, dense layers with dropout, softmax over the classes."""
    inputs = keras.Input(shape=image_shape, name="image")
    x = inputs
    for i, block in enumerate(spec.conv):
        x = layers.Conv2D(
            block.filters, block.kernel_size, activation=block.activation, padding=block.padding,
            kernel_initializer=spec.initializer, name=f"conv{i}",
        )(x)
        if block.pool:
            x = layers.MaxPooling2D(2, padding="same", name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    for i, width in enumerate(spec.dense):
        x = layers.Dense(width, activation=spec.dense_activation, name=f"dense{i}")(x)
        if spec.dropout:
            x = layers.Dropout(spec.dropout, name=f"dropout{i}")(x)
    x = layers.Dense(spec.num_classes, activation=spec.logits_activation, name="logits")(x)
    outputs = layers.Softmax(name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)
