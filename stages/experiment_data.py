"""An experiment's arrays: inputs and targets (images or labels) per split, still uint8."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.errors import PipelineError
from stages.experiment_params import Experiment
from stages.images import DatasetFile, load


def data_path(ref: str) -> Path:
    """``prepared/mnist`` -> ``data/prepared/mnist.npz``."""
    return Path("data") / f"{ref}.npz"


@dataclass
class Arrays:
    x: np.ndarray  # uint8 NHWC inputs
    y: np.ndarray  # uint8 NHWC target images (autoencoders) or int64 labels (classifiers)

    def __len__(self) -> int:
        return len(self.x)


class ExperimentData:
    """Loads an experiment's input (and target) dataset files once."""

    def __init__(self, name: str, experiment: Experiment):
        self.name, self.experiment = name, experiment
        self.inputs: DatasetFile = load(data_path(experiment.data.input))
        self.targets: DatasetFile = self.inputs
        if experiment.task == "autoencoder" and experiment.data.target != experiment.data.input:
            self.targets = load(data_path(experiment.data.target))
            for split, arrays in self.inputs.splits.items():
                if len(arrays) != len(self.targets.splits[split]):
                    raise PipelineError(
                        f"experiments.{name}: input {experiment.data.input} has {len(arrays)} {split} images "
                        f"but target {experiment.data.target} has {len(self.targets.splits[split])}"
                    )

    @property
    def class_names(self) -> list[str]:
        return self.inputs.class_names

    @property
    def source(self) -> str:
        return str(self.inputs.meta.get("source", "unknown"))

    def split(self, *names: str) -> Arrays:
        """The named splits, concatenated in order."""
        def gather(data: DatasetFile, field: str) -> np.ndarray:
            parts = [getattr(data.splits[n], field) for n in names]
            return parts[0] if len(parts) == 1 else np.concatenate(parts)

        x = gather(self.inputs, "images")
        if self.experiment.task == "autoencoder":
            y = x if self.targets is self.inputs else gather(self.targets, "images")
        else:
            y = gather(self.inputs, "labels")
        return Arrays(x, y)

    def training(self) -> tuple[Arrays, Arrays]:
        data = self.experiment.data
        train = self.split(*data.train_on.split("+"))
        return train, self.split(data.validate_on)
