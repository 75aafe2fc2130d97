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


class Training(_Strict):
    loss: Literal["mse", "bce", "sparse_categorical_crossentropy"]
    optimizer: Literal["adam", "rmsprop", "sgd"] = "adam"
    learning_rate: Annotated[float, Field(gt=0)] | None = None  # None: Keras' default for the optimizer
    epochs: Positive
    batch_size: Positive
    seed: int = 0
    metrics: tuple[Literal["accuracy"], ...] = ()  # extra Keras metrics, as the seeds asked for
    mixed_precision: bool = False  # bf16 compute, float32 variables
    jit_compile: bool | Literal["auto"] = "auto"  # XLA
    steps_per_execution: Positive = 1
    # data_parallel: one replica per visible device (GPUs, else CPUs), batch_size the global batch
    distribution: Literal["none", "data_parallel"] = "none"


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

    def spec(self):
        from stages.models import AutoencoderSpec  # keras stays out of the data stages' start-up

        return AutoencoderSpec(tuple(self.filters), self.poolings, self.activation, self.output_activation)


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

    def spec(self, num_classes: int):
        from stages.models import ClassifierSpec, ConvBlock

        blocks = tuple(ConvBlock(b.filters, b.kernel_size, b.activation, b.padding, b.pool) for b in self.conv)
        return ClassifierSpec(blocks, num_classes, self.initializer, tuple(self.dense),
                              self.dense_activation, self.dropout, self.logits_activation)


class Experiment(_Strict):
    task: Literal["autoencoder", "classifier"]
    description: str = ""
    seed_figure: str | None = None  # the seed question's published result, quoted for the report
    data: Data
    model: Annotated[Union[ConvAutoencoder, Cnn], Field(discriminator="kind")]
    training: Training

    @model_validator(mode="after")
    def _consistent(self) -> "Experiment":
        autoencoder = self.task == "autoencoder"
        if autoencoder != (self.model.kind == "conv_autoencoder"):
            raise ValueError(f"task '{self.task}' does not match model kind '{self.model.kind}'")
        if autoencoder and self.training.loss not in ("mse", "bce"):
            raise ValueError(f"an autoencoder needs loss mse or bce, not '{self.training.loss}'")
        if not autoencoder and self.training.loss != "sparse_categorical_crossentropy":
            raise ValueError("a classifier needs loss sparse_categorical_crossentropy")
        if not autoencoder and self.data.target != self.data.input:
            raise ValueError("a classifier's data.target must be its data.input (the labels come from it)")
        return self
