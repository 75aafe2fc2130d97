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
import numpy as np
from keras import layers

from stages.recipes import RandomShift


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


# --- Improved models (beyond the seeds): batch norm, strided and residual blocks ---


@dataclass(frozen=True)
class ResidualAutoencoderSpec:
    """``filters[i]``: width after ``i`` halvings (``len(filters) = poolings + 1``);
    ``blocks[i]``: residual blocks at that level, in the encoder and again in the decoder.

    The encoder halves the image with stride-2 convs, the bottleneck is a
    linear 1x1 conv to ``latent_channels`` (so the latent has the seed
    model's shape), and the decoder doubles back with transposed convs.

    ``linear_path``: a frozen linear encoder and decoder beside the conv ones
    (set to PCA of the training images by :func:`init_linear_path`); the conv
    encoder adds to the PCA codes and the conv decoder adds a correction to
    the PCA reconstruction, both starting at zero, so training starts from
    the linear optimum at this latent size instead of from noise.
    ``input_skip``: the output is the input plus the conv decoder's
    correction (for corruption tasks such as colorization, where the input
    already holds most of the target).
    ``refiner``: widths of full-resolution 3x3 ReLU convs (no batch norm)
    that read that image (the PCA reconstruction plus the decoder's
    correction, or the input plus it) and add their own zero-initialized
    correction: a non-linear decoder in the image domain, which can sharpen
    edges and saturate flat regions that a linear decoder leaves blurred.
    The conv decoder alone could not learn this from a PCA start: its
    features see only the codes, of which the PCA residual is no linear
    function, so its zero head got almost no gradient.
    """

    filters: tuple[int, ...]
    blocks: tuple[int, ...]
    latent_channels: int
    output_activation: str = "sigmoid"
    linear_path: bool = False
    input_skip: bool = False
    refiner: tuple[int, ...] = ()
    bn_momentum: float = 0.99

    @property
    def poolings(self) -> int:
        return len(self.filters) - 1


@dataclass(frozen=True)
class ResStage:
    filters: int
    blocks: int = 0  # residual blocks after the stage's conv (and pooling)
    pool: bool = True


@dataclass(frozen=True)
class ResNetSpec:
    """A ResNet-9-style classifier: stem conv, stages of conv-BN-ReLU (+ max
    pooling, + residual blocks), global max pooling, one dense layer whose
    logits are multiplied by ``logit_scale`` before the softmax. ``augment``
    adds random horizontal flips and shifts by up to ``translate`` of the side,
    rounded to whole pixels (zero-filled: a padded random crop, see
    :class:`RandomShift`), in front of the network, active only in training,
    so they run on the accelerator inside the compiled step.

    ``bn_momentum`` (both improved kinds): the batch-norm layers' moving
    statistics keep this much of their value at each step. Keras' 0.99
    still holds 0.99**n of the initial mean 0 and variance 1 after n steps
    (37% after 98, one CIFAR-10 epoch at batch 512), so inference on a short
    run uses statistics the activations never had; 0.9 forgets them in tens
    of steps."""

    stem: int
    stages: tuple[ResStage, ...]
    num_classes: int = 10
    dropout: float = 0.0
    logit_scale: float = 1.0
    flip: bool = False
    translate: float = 0.0
    bn_momentum: float = 0.99


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


def residual_latent_shape(spec: ResidualAutoencoderSpec, image_shape) -> tuple[int, int, int]:
    if len(spec.blocks) != len(spec.filters):
        raise ValueError(f"blocks has {len(spec.blocks)} entries but filters has {len(spec.filters)}: one per level")
    shape = latent_shape(AutoencoderSpec(spec.filters, spec.poolings), image_shape)
    shape = shape[:2] + (spec.latent_channels,)
    if spec.linear_path or spec.input_skip:
        if spec.output_activation != "linear":
            raise ValueError("linear_path and input_skip add a correction to an image: "
                             f"they need output_activation linear, not {spec.output_activation}")
        if spec.linear_path and spec.input_skip:
            raise ValueError("linear_path and input_skip are alternatives: choose one")
    if spec.refiner and not (spec.linear_path or spec.input_skip):
        raise ValueError("refiner refines a base image: it needs linear_path or input_skip")
    values = int(image_shape[0] * image_shape[1] * image_shape[2])
    if spec.linear_path and shape[0] * shape[1] * shape[2] > values:
        raise ValueError(f"linear_path needs a latent of at most the image's {values} values, "
                         f"got {'x'.join(map(str, shape))}")
    return shape


LINEAR_ENCODER, LINEAR_DECODER = "linear_encoder", "linear_decoder"


def build_residual_autoencoder(spec: ResidualAutoencoderSpec, image_shape: tuple[int, int, int],
                               name: str = "autoencoder"):
    """Return (autoencoder, encoder) Keras models."""
    shape = residual_latent_shape(spec, image_shape)
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


def build_resnet(spec: ResNetSpec, image_shape: tuple[int, int, int], name: str = "classifier"):
    inputs = keras.Input(shape=image_shape, name="image")
    x = inputs
    if spec.flip:
        x = layers.RandomFlip("horizontal", name="augment_flip")(x)
    if spec.translate:
        x = RandomShift(round(spec.translate * min(image_shape[:2])), name="augment_translate")(x)
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
    x = layers.Dense(spec.num_classes, use_bias=False, name="logits")(x)
    if spec.logit_scale != 1.0:
        x = layers.Rescaling(spec.logit_scale, name="logit_scale")(x)
    outputs = layers.Softmax(name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def model_latent_shape(spec, image_shape) -> tuple[int, int, int]:
    """The bottleneck shape of either autoencoder spec."""
    if isinstance(spec, ResidualAutoencoderSpec):
        return residual_latent_shape(spec, image_shape)
    return latent_shape(spec, image_shape)


def has_linear_path(spec) -> bool:
    return isinstance(spec, ResidualAutoencoderSpec) and spec.linear_path


def build_any_autoencoder(spec, image_shape, name: str = "autoencoder"):
    if isinstance(spec, ResidualAutoencoderSpec):
        return build_residual_autoencoder(spec, image_shape, name)
    return build_autoencoder(spec, image_shape, name)


def build_any_classifier(spec, image_shape, name: str = "classifier"):
    if isinstance(spec, ResNetSpec):
        return build_resnet(spec, image_shape, name)
    return build_classifier(spec, image_shape, name)
