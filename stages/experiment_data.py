"""An experiment's arrays: inputs and targets (images or labels) per split, still uint8."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.errors import PipelineError
from stages.experiment_params import Experiment
from stages.images import load


def data_path(ref: str) -> Path:
    """``prepared/mnist`` -> ``data/prepared/mnist.npz``."""
    return Path("data") / f"{ref}.npz"


@dataclass
class Arrays:
    x: np.ndarray  # uint8 NHWC inputs
    y: np.ndarray  # uint8 NHWC target images (autoencoders) or int64 labels (classifiers)

    def __len__(self) -> int:
        return len(self.x)

    def release(self) -> None:
        """Let go of the arrays, for every holder of this object at once (a
        PyDataset that Keras on TensorFlow keeps alive, see ScaledBatches)."""
        self.x = self.y = None


def split_files(input_ref: str, target_ref: str, arrays: Arrays) -> dict[str, tuple[str, dict[str, np.ndarray]]]:
    """Which file each array of a split came from: ``{ref: (path, {"x"|"y": array})}``
    (one file for both when the input is the target's file, or a classifier's)."""
    if input_ref == target_ref:
        return {input_ref: (str(data_path(input_ref)), {"x": arrays.x, "y": arrays.y})}
    return {input_ref: (str(data_path(input_ref)), {"x": arrays.x}),
            target_ref: (str(data_path(target_ref)), {"y": arrays.y})}


def join(parts: Iterable[np.ndarray]) -> np.ndarray:
    """Arrays concatenated along the first axis; a single one as it is (no copy)."""
    parts = list(parts)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class ExperimentData:
    """An experiment's input (and target) dataset files.

    The class names and meta are read at once (a missing or unreadable file
    fails before any work); a split's arrays are read from the file when
    asked for and not kept here, so a stage holds only the splits it uses,
    each once (train+val is read and joined, its two parts let go)."""

    def __init__(self, name: str, experiment: Experiment):
        self.name, self.experiment = name, experiment
        self.input_path = data_path(experiment.data.input)
        self.target_path = (data_path(experiment.data.target) if experiment.task == "autoencoder"
                            and experiment.data.target != experiment.data.input else None)
        info = load(self.input_path, splits=())
        self.class_names: list[str] = info.class_names
        self.meta: dict = info.meta
        if self.target_path is not None:
            load(self.target_path, splits=())

    @property
    def source(self) -> str:
        return str(self.meta.get("source", "unknown"))

    def target_images(self, *names: str) -> np.ndarray:
        """An autoencoder's target images of the named splits, concatenated in
        order (its inputs where it has no target file), without its inputs."""
        if self.experiment.task != "autoencoder":
            raise ValueError(f"experiments.{self.name} is a {self.experiment.task}: its targets are labels")
        return join(split.images for split in load(self.target_path or self.input_path, names).splits.values())

    def split(self, *names: str) -> Arrays:
        """The named splits' inputs and targets, concatenated in order."""
        inputs = load(self.input_path, names).splits.values()
        x = join(split.images for split in inputs)
        if self.experiment.task != "autoencoder":
            return Arrays(x, join(split.labels for split in inputs))
        if self.target_path is None:
            return Arrays(x, x)
        y = self.target_images(*names)
        if len(y) != len(x):
            raise PipelineError(
                f"experiments.{self.name}: input {self.experiment.data.input} has {len(x)} {'+'.join(names)} "
                f"images but target {self.experiment.data.target} has {len(y)}"
            )
        return Arrays(x, y)

    def training(self) -> tuple[Arrays, Arrays]:
        data = self.experiment.data
        train = self.split(*data.train_on.split("+"))
        return train, self.split(data.validate_on)
