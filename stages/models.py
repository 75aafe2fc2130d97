"""Keras model builders driven by params: conv autoencoders and CNN classifiers.

Each builder takes the validated params of its ``model.kind`` (the classes of
:mod:`stages.experiment_params`); :func:`build` picks the builder by kind.

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

import keras
import numpy as np
from keras import layers

from stages.experiment_params import Cnn, ConvAutoencoder, ResidualAutoencoder, ResNet
from stages.recipes import RandomShift

KERNEL_SIZE = 3


def encoder_pools(spec: ConvAutoencoder) -> list[bool]:
    """Whether each encoder level is followed by a pooling."""
    levels = len(spec.filters)
    return [i < spec.poolings - 1 or (i == levels - 1 and spec.poolings > 0) for i in range(levels)]


def latent_shape(spec: ConvAutoencoder | ResidualAutoencoder, image_shape) -> tuple[int, int, int]:
    """The bottleneck's shape for ``image_shape``; error if the poolings do not
    divide its sides, or a ``linear_path`` latent has more values than the image."""
    height, width, channels = image_shape
    factor = 2 ** spec.poolings
    if height % factor or width % factor:
        raise ValueError(
            f"{spec.poolings} poolings need image sides divisible by {factor}, got {height}x{width}"
        )
    if spec.kind == "conv_autoencoder":
        return (height // factor, width // factor, spec.filters[-1])
    shape = (height // factor, width // factor, spec.latent_channels)
    if spec.linear_path and shape[0] * shape[1] * shape[2] > height * width * channels:
        raise ValueError(f"linear_path needs a latent of at most the image's {height * width * channels} values, "
                         f"got {'x'.join(map(str, shape))}")
    return shape


def build_autoencoder(spec: ConvAutoencoder, image_shape: tuple[int, int, int], name: str = "autoencoder"):
    """Return (autoencoder, encoder) Keras models."""
    latent_shape(spec, image_shape)  # validates divisibility
    conv = dict(kernel_size=KERNEL_SIZE, activation=spec.activation, padding="same")
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
        image_shape[2], KERNEL_SIZE, padding="same",
        activation=spec.output_activation, name="reconstruction", dtype="float32",
    )(x)
    return keras.Model(inputs, outputs, name=name), keras.Model(inputs, latent, name=f"{name}_encoder")


def build_classifier(spec: Cnn, image_shape: tuple[int, int, int], num_classes: int, name: str = "classifier"):
    """A CNN: conv blocks, flatten, dense layers with dropout, softmax over the classes
    (``logits_activation: relu`` and convs without activation reproduce the colored-MNIST bug)."""
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
    x = layers.Dense(num_classes, activation=spec.logits_activation, name="logits")(x)
    outputs = layers.Softmax(name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


# --- Improved models (beyond the seeds): batch norm, strided and residual blocks ---


def _conv_bn(x, filters: int, name: str, momentum: float, strides: int = 1, kernel_size: int = 3,
             activation: bool = True):
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=momentum, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x) if activation else x


def _residual(x, filters: int, name: str, momentum: float):
    """``relu(x + bn(conv(relu(bn(conv(x))))))``: two 3x3 convs around an identity skip."""
    y = _conv_bn(x, filters, f"{name}a", momentum)
    y = _conv_bn(y, filters, f"{name}b", momentum, activation=False)
    return layers.Activation("relu", name=f"{name}_out")(layers.Add(name=f"{name}_add")([x, y]))


LINEAR_ENCODER, LINEAR_DECODER = "linear_encoder", "linear_decoder"


def build_residual_autoencoder(spec: ResidualAutoencoder, image_shape: tuple[int, int, int],
                               name: str = "autoencoder"):
    """Return (autoencoder, encoder) Keras models."""
    shape = latent_shape(spec, image_shape)
    residual_head = dict(kernel_initializer="zeros") if spec.linear_path or spec.input_skip else {}
    inputs = keras.Input(shape=image_shape, name="image")
    momentum = spec.bn_momentum
    x = _conv_bn(inputs, spec.filters[0], "enc_stem", momentum)
    for level, (filters, blocks) in enumerate(zip(spec.filters, spec.blocks)):
        if level:
            x = _conv_bn(x, filters, f"enc_down{level}", momentum, strides=2)
        for block in range(blocks):
            x = _residual(x, filters, f"enc{level}_res{block}", momentum)
    latent = layers.Conv2D(spec.latent_channels, 1, name="latent", **residual_head)(x)
    if spec.linear_path:  # float32: PCA's small trailing components would drown in bf16 rounding
        codes = layers.Dense(shape[0] * shape[1] * shape[2], trainable=False, dtype="float32",
                             name=LINEAR_ENCODER)(layers.Flatten(name="linear_flatten")(inputs))
        latent = layers.Add(name="latent_sum", dtype="float32")([layers.Reshape(shape, name="codes")(codes), latent])
    x = _conv_bn(latent, spec.filters[-1], "dec_stem", momentum)
    for level in reversed(range(len(spec.filters))):
        for block in range(spec.blocks[level]):
            x = _residual(x, spec.filters[level], f"dec{level}_res{block}", momentum)
        if level:
            x = layers.Conv2DTranspose(spec.filters[level - 1], 3, strides=2, padding="same", use_bias=False,
                                       name=f"dec_up{level}_conv")(x)
            x = layers.Activation("relu", name=f"dec_up{level}_relu")(
                layers.BatchNormalization(momentum=momentum, name=f"dec_up{level}_bn")(x))
    if not (spec.linear_path or spec.input_skip):
        outputs = layers.Conv2D(image_shape[2], 3, padding="same", activation=spec.output_activation,
                                name="reconstruction", dtype="float32")(x)
        return keras.Model(inputs, outputs, name=name), keras.Model(inputs, latent, name=f"{name}_encoder")
    correction = layers.Conv2D(image_shape[2], 3, padding="same", name="correction", dtype="float32",
                               **residual_head)(x)
    if spec.linear_path:
        flat = layers.Dense(int(np.prod(image_shape)), trainable=False, dtype="float32", name=LINEAR_DECODER)(
            layers.Flatten(name="latent_flatten")(latent))
        base = layers.Reshape(image_shape, name="linear_image")(flat)
    else:
        base = inputs
    outputs = layers.Add(name="refiner_input" if spec.refiner else "reconstruction", dtype="float32")(
        [base, correction])
    if spec.refiner:
        x = outputs
        for index, width in enumerate(spec.refiner):
            x = layers.Conv2D(width, 3, padding="same", activation="relu", name=f"refine{index}")(x)
        refinement = layers.Conv2D(image_shape[2], 3, padding="same", kernel_initializer="zeros", dtype="float32",
                                   name="refine_out")(x)
        outputs = layers.Add(name="reconstruction", dtype="float32")([outputs, refinement])
    return keras.Model(inputs, outputs, name=name), keras.Model(inputs, latent, name=f"{name}_encoder")


def init_linear_path(model: keras.Model, mean: np.ndarray, vectors: np.ndarray) -> None:
    """Set a ``linear_path`` autoencoder's linear encoder and decoder to a PCA
    (``mean`` of the flattened images, ``vectors`` as columns, see
    :func:`stages.metrics.pca_fit`): codes = (x - mean) @ vectors,
    image = codes @ vectors.T + mean."""
    encoder, decoder = model.get_layer(LINEAR_ENCODER), model.get_layer(LINEAR_DECODER)
    vectors = np.asarray(vectors, np.float32)
    mean = np.asarray(mean, np.float32)
    expected = tuple(encoder.kernel.shape)
    if vectors.shape != expected:
        raise ValueError(f"PCA vectors {vectors.shape} do not fit the linear encoder {expected}")
    encoder.set_weights([vectors, -(mean @ vectors)])
    decoder.set_weights([vectors.T.copy(), mean])


def build_resnet(spec: ResNet, image_shape: tuple[int, int, int], num_classes: int, name: str = "classifier"):
    inputs = keras.Input(shape=image_shape, name="image")
    x = inputs
    if spec.augment.flip:
        x = layers.RandomFlip("horizontal", name="augment_flip")(x)
    if spec.augment.translate:
        x = RandomShift(round(spec.augment.translate * min(image_shape[:2])), name="augment_translate")(x)
    x = _conv_bn(x, spec.stem, "stem", spec.bn_momentum)
    for i, stage in enumerate(spec.stages):
        x = _conv_bn(x, stage.filters, f"stage{i}", spec.bn_momentum)
        if stage.pool:
            x = layers.MaxPooling2D(2, padding="same", name=f"stage{i}_pool")(x)
        for block in range(stage.blocks):
            x = _residual(x, stage.filters, f"stage{i}_res{block}", spec.bn_momentum)
    x = layers.GlobalMaxPooling2D(name="global_pool")(x)
    if spec.dropout:
        x = layers.Dropout(spec.dropout, name="dropout")(x)
    x = layers.Dense(num_classes, use_bias=False, name="logits")(x)
    if spec.logit_scale != 1.0:
        x = layers.Rescaling(spec.logit_scale, name="logit_scale")(x)
    outputs = layers.Softmax(name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def build(spec, image_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """The model ``spec`` describes (an experiment's ``model`` section) for
    ``image_shape``; ``num_classes`` is used by classifiers."""
    if spec.kind == "conv_autoencoder":
        return build_autoencoder(spec, image_shape)[0]
    if spec.kind == "residual_autoencoder":
        return build_residual_autoencoder(spec, image_shape)[0]
    if spec.kind == "cnn":
        return build_classifier(spec, image_shape, num_classes)
    return build_resnet(spec, image_shape, num_classes)
