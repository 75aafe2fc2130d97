"""The ``experiments`` section of params.yaml: one entry per named experiment.

Kept beside stages/params.py (which validates it with everything else) so
that each module stays small. Each experiment names its data by path stem:
``prepared/<dataset>`` or ``corrupted/<corruption>``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

Positive = Annotated[int, Field(ge=1)]
DataRef = Annotated[str, Field(pattern=r"^(prepared|corrupted)/[A-Za-z0-9_.-]+$")]
Activation = Literal["relu", "elu", "gelu", "swish", "tanh", "sigmoid", "linear"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Data(_Strict):
    input: DataRef
    target: DataRef  # autoencoders: the images to reconstruct; classifiers: the input (its labels)
    train_on: Literal["train", "train+val"] = "train"
    validate_on: Literal["val", "test"] = "val"  # the seed questions validated on test


Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
# batch norm's moving statistics keep this share per step (Keras' default 0.99;
# 0.9 for runs of a few hundred steps, see ResNet)
BnMomentum = Annotated[float, Field(gt=0.0, lt=1.0)]


class Training(_Strict):
    # psnr: minus each image's PSNR in dB, averaged (stages.recipes.NegativePsnr); autoencoders only
    loss: Literal["mse", "bce", "psnr", "sparse_categorical_crossentropy"]
    optimizer: Literal["adam", "adamw", "rmsprop", "sgd"] = "adam"
    learning_rate: Annotated[float, Field(gt=0)] | None = None  # None: Keras' default for the optimizer
    # constant, or a schedule over all steps whose peak is learning_rate
    schedule: Literal["constant", "one_cycle", "cosine"] = "constant"
    warmup: Fraction | None = None  # share of the steps spent warming up (one_cycle 0.25, cosine 0.05)
    weight_decay: Annotated[float, Field(ge=0)] | None = None  # adamw (default 0.004) and sgd
    momentum: Fraction = 0.0  # sgd only
    nesterov: bool = False  # sgd only
    label_smoothing: Fraction = 0.0  # classifiers only
    epochs: Positive
    batch_size: Positive
    seed: int = 0
    metrics: tuple[Literal["accuracy"], ...] = ()  # extra Keras metrics, as the seeds asked for
    mixed_precision: bool = False  # bf16 compute, float32 variables
    jit_compile: bool | Literal["auto"] = "auto"  # XLA
    # batches per call into the backend, callbacks once per call; the same
    # steps and updates. On TensorFlow they run in one graph loop, so fewer
    # Python round trips (docs/benchmarks.md). A call ends on an epoch's end,
    # so the number used divides an epoch's batches: the largest up to this
    # one, or where that is under half of it the smallest above. Unset: 16
    # on one device, 1 with data_parallel (TensorFlow's MirroredStrategy
    # fails with more)
    steps_per_execution: Positive | None = None
    # update the weights every N batches with their mean gradient: the optimizer
    # sees batch_size x N images a step while only batch_size are in memory
    gradient_accumulation_steps: Annotated[int, Field(ge=2)] | None = None
    # data_parallel: one replica per visible device (GPUs, else CPUs), batch_size the global batch
    distribution: Literal["none", "data_parallel"] = "none"
    # copy the uint8 train and validation images to the accelerator once and
    # gather and scale each batch there (no pixels gathered on the host or copied
    # per step); the batches are bit for bit the same
    data_on_device: bool = False
    # seconds of training between checkpoints: after an epoch one is written
    # only once this many have passed since the last (0: after every epoch);
    # the last epoch always gets one; a kill loses at most this much training
    # and one epoch. It changes no result (a resumed run ends as an
    # uninterrupted one), so it is not part of the checkpoint's fingerprint
    checkpoint_interval_s: Annotated[float, Field(ge=0)] = 120.0

    @property
    def steps_per_call(self) -> int:
        """``steps_per_execution``, or its default when unset."""
        return self.steps_per_execution or (16 if self.distribution == "none" else 1)

    @model_validator(mode="after")
    def _options_fit(self) -> "Training":
        if self.schedule != "constant" and self.learning_rate is None:
            raise ValueError(f"schedule '{self.schedule}' needs learning_rate (its peak)")
        if self.warmup is not None and self.schedule == "constant":
            raise ValueError("warmup applies to a schedule (one_cycle or cosine), not to a constant rate")
        if (self.momentum or self.nesterov) and self.optimizer != "sgd":
            raise ValueError(f"momentum and nesterov apply to optimizer sgd, not '{self.optimizer}'")
        if self.weight_decay is not None and self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"weight_decay applies to optimizer adamw or sgd, not '{self.optimizer}'")
        if self.gradient_accumulation_steps and self.distribution != "none":
            raise ValueError("gradient_accumulation_steps is not supported with distribution "
                             f"'{self.distribution}' (each replica's batch is already a share of batch_size)")
        if self.data_on_device and self.distribution != "none":
            raise ValueError(f"data_on_device is not supported with distribution '{self.distribution}' "
                             "(the replicas' batches are split from host arrays)")
        return self


class ConvAutoencoder(_Strict):
    kind: Literal["conv_autoencoder"]
    filters: Annotated[tuple[Positive, ...], Field(min_length=1)]
    poolings: Annotated[int, Field(ge=0)]
    activation: Activation = "relu"
    output_activation: Literal["sigmoid", "linear"] = "sigmoid"

    @model_validator(mode="after")
    def _poolings_fit(self) -> "ConvAutoencoder":
        if self.poolings > len(self.filters):
            raise ValueError(f"poolings={self.poolings} exceeds the {len(self.filters)} conv levels")
        return self



class ResidualAutoencoder(_Strict):
    """Batch norm, stride-2 convs and residual blocks. ``filters[i]`` is the
    width after ``i`` halvings (so ``len(filters) - 1`` is the poolings) and
    ``blocks[i]`` the residual blocks at that level, in the encoder and again
    in the decoder. The bottleneck is a linear 1x1 conv to ``latent_channels``
    (so the latent can have a seed model's shape); the decoder doubles back
    with transposed convs.

    ``linear_path``: a frozen linear encoder and decoder beside the conv ones,
    set to the PCA of the training images; the conv encoder adds to the PCA
    codes and the conv decoder adds a correction to the PCA reconstruction,
    both starting at zero, so training starts from the linear optimum at this
    latent size instead of from noise. ``input_skip``: the output is the
    input plus the decoder's correction (corruption tasks such as
    colorization, where the input already holds most of the target).
    ``refiner``: widths of full-resolution 3x3 ReLU convs that read that image
    and add their own zero-initialized correction: a non-linear decoder in
    the image domain, which can sharpen edges that a linear decoder leaves
    blurred (the conv decoder alone gets almost no gradient from a PCA start:
    its features see only the codes, of which the PCA residual is no linear
    function).
    """

    kind: Literal["residual_autoencoder"]
    filters: Annotated[tuple[Positive, ...], Field(min_length=1)]
    blocks: Annotated[tuple[Annotated[int, Field(ge=0)], ...], Field(min_length=1)]  # residual blocks per level
    latent_channels: Positive
    output_activation: Literal["sigmoid", "linear"] = "sigmoid"
    # a frozen PCA encoder/decoder beside the conv ones, which learn corrections to it
    linear_path: bool = False
    # output = input + the decoder's correction (corruption tasks: colorization, denoising)
    input_skip: bool = False
    # widths of full-resolution convs refining that image (non-linear decoding in the image domain)
    refiner: tuple[Positive, ...] = ()
    bn_momentum: BnMomentum = 0.99

    @model_validator(mode="after")
    def _one_per_level(self) -> "ResidualAutoencoder":
        if len(self.blocks) != len(self.filters):
            raise ValueError(f"blocks has {len(self.blocks)} entries, filters {len(self.filters)}: "
                             "give one block count per level")
        if self.linear_path and self.input_skip:
            raise ValueError("linear_path and input_skip are alternatives: choose one")
        if (self.linear_path or self.input_skip) and self.output_activation != "linear":
            raise ValueError("linear_path and input_skip add a correction to an image: "
                             "they need output_activation: linear")
        if self.refiner and not (self.linear_path or self.input_skip):
            raise ValueError("refiner refines a base image: it needs linear_path or input_skip")
        return self

    @property
    def poolings(self) -> int:
        return len(self.filters) - 1



class Block(_Strict):
    filters: Positive
    kernel_size: Positive = 3
    activation: Activation | None = "relu"
    padding: Literal["same", "valid"] = "same"
    pool: bool = True


class Cnn(_Strict):
    kind: Literal["cnn"]
    conv: Annotated[tuple[Block, ...], Field(min_length=1)]
    initializer: Literal["glorot_uniform", "he_normal", "he_uniform", "lecun_normal"] = "glorot_uniform"
    dense: tuple[Positive, ...] = ()
    dense_activation: Activation = "relu"
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    logits_activation: Literal["relu"] | None = None  # "relu": the colored-MNIST bug



class Stage(_Strict):
    filters: Positive
    blocks: Annotated[int, Field(ge=0)] = 0
    pool: bool = True


class Augment(_Strict):
    flip: bool = False  # random horizontal flips (not for digits)
    translate: Annotated[float, Field(ge=0.0, le=0.5)] = 0.0  # random shifts, a fraction of the side


class ResNet(_Strict):
    """ResNet-9 style: stem conv, stages (conv-BN-ReLU, pooling, residual
    blocks), global max pooling, dense logits times ``logit_scale``. The
    augmentation (random horizontal flips, shifts by up to ``translate`` of the
    side rounded to whole pixels and zero-filled: a padded random crop) runs
    inside the model, on the accelerator, in training only.

    ``bn_momentum`` (both batch-norm kinds): the share of the moving statistics
    kept at each step. Keras' 0.99 still holds 0.99**n of the initial mean 0
    and variance 1 after n steps (37% after 98, one CIFAR-10 epoch at batch
    512), so inference after a short run uses statistics the activations
    never had; 0.9 forgets them in tens of steps."""

    kind: Literal["resnet"]
    stem: Positive
    stages: Annotated[tuple[Stage, ...], Field(min_length=1)]
    dropout: Fraction = 0.0
    logit_scale: Annotated[float, Field(gt=0)] = 1.0
    augment: Augment = Augment()
    bn_momentum: BnMomentum = 0.99



class Evaluation(_Strict):
    flip_tta: bool = False  # classifiers: average the predictions of each test image and its mirror image


def kinds(*classes: type[BaseModel]) -> tuple[str, ...]:
    """The ``kind`` tags of the classes of a discriminated union."""
    return tuple(value for cls in classes for value in cls.model_fields["kind"].annotation.__args__)


AUTOENCODERS = (ConvAutoencoder, ResidualAutoencoder)
CLASSIFIERS = (Cnn, ResNet)
AUTOENCODER_KINDS = kinds(*AUTOENCODERS)
Model = Annotated[Union[AUTOENCODERS + CLASSIFIERS], Field(discriminator="kind")]


class Experiment(_Strict):
    task: Literal["autoencoder", "classifier"]
    description: str = ""
    seed_figure: str | None = None  # the seed question's published result, quoted for the report
    improves_on: str | None = None  # the seed experiment this one improves on, compared in the report
    data: Data
    model: Model
    training: Training
    evaluation: Evaluation = Evaluation()

    @model_validator(mode="after")
    def _consistent(self) -> "Experiment":
        autoencoder = self.task == "autoencoder"
        if autoencoder != (self.model.kind in AUTOENCODER_KINDS):
            raise ValueError(f"task '{self.task}' does not match model kind '{self.model.kind}'")
        if autoencoder and self.training.loss not in ("mse", "bce", "psnr"):
            raise ValueError(f"an autoencoder needs loss mse, bce or psnr, not '{self.training.loss}'")
        if not autoencoder and self.training.loss != "sparse_categorical_crossentropy":
            raise ValueError("a classifier needs loss sparse_categorical_crossentropy")
        if not autoencoder and self.data.target != self.data.input:
            raise ValueError("a classifier's data.target must be its data.input (the labels come from it)")
        if autoencoder and self.training.label_smoothing:
            raise ValueError("training.label_smoothing applies to classifiers")
        if autoencoder and self.evaluation.flip_tta:
            raise ValueError("evaluation.flip_tta applies to classifiers")
        corrects = getattr(self.model, "linear_path", False) or getattr(self.model, "input_skip", False)
        if corrects and self.training.loss not in ("mse", "psnr"):
            raise ValueError(f"model.linear_path and model.input_skip have an unbounded (linear) output: "
                             f"they need training.loss mse or psnr, not '{self.training.loss}'")
        if getattr(self.model, "input_skip", False) and self.data.input == self.data.target:
            raise ValueError("model.input_skip would copy the input past the bottleneck: it needs a corrupted "
                             f"data.input, but input and target are both {self.data.input}")
        return self
