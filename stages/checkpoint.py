"""``checkpoints/<experiment>/``: where a killed training resumes from.

``state.json`` holds a :class:`State`; after epoch *e* is checkpointed it
names ``model-<e>/`` (the model with its optimizer state, in Keras' unzipped
format: the weights go to disk as they are written, where a zipped ``.keras``
file first holds them all in memory) and ``rng-<e>.npz`` (the layers' RNG
states: dropout masks continue as in an uninterrupted run). Those are written
first, then ``state.json`` is replaced atomically to name them, then older
ones are removed: whenever the process is killed, ``state.json`` names a
complete pair or none. A state is used only for the same params and data
(its fingerprint) and only while its run is not complete.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from stages import atomic
from stages.errors import PipelineError


@dataclass
class State:
    fingerprint: str  # of the params, data and epochs the run trains for
    run_id: str  # the MLflow run, continued on resume
    epoch: int = 0  # epochs in the saved model; 0: none saved yet (the run exists)
    history: dict[str, list[float]] = field(default_factory=dict)  # per-epoch metrics up to ``epoch``
    logged: int = 0  # epochs whose metrics MLflow has (may run ahead of ``epoch``)
    described: bool = False  # the run's params and tags are logged
    complete: bool = False  # trained, exported and logged: nothing to resume
    model: str | None = None  # the folder of the saved model, when epoch > 0
    rng: str | None = None  # the file of the saved RNG states, when epoch > 0


def rng_states(model: keras.Model) -> list[np.ndarray]:
    """Variables that are not weights: the seed generators' states (dropout masks)."""
    weights = {id(w) for w in model.weights}
    return [np.asarray(v.numpy()) for v in model.variables if id(v) not in weights]


def restore_rng_states(model: keras.Model, states: list[np.ndarray]) -> None:
    weights = {id(w) for w in model.weights}
    variables = [v for v in model.variables if id(v) not in weights]
    if len(variables) != len(states):
        raise PipelineError(f"checkpoint holds {len(states)} RNG states, model has {len(variables)}")
    for variable, state in zip(variables, states):
        variable.assign(state)


class Checkpoint:
    """The checkpoint folder of one experiment, for runs of ``fingerprint``."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder, self.fingerprint = folder, fingerprint
        self.path = folder / "state.json"

    def read(self) -> State | None:
        """The folder's state, whatever its fingerprint; None if there is none (or it is unreadable)."""
        try:
            return State(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def resumable(self, state: State | None) -> bool:
        """A state to resume from: same params and data, and not a finished run."""
        return state is not None and not state.complete and state.fingerprint == self.fingerprint

    def start(self, run_id: str) -> State:
        """A fresh state for run ``run_id``: from here on a killed training continues this run."""
        self.folder.mkdir(parents=True, exist_ok=True)
        state = State(self.fingerprint, run_id)
        self.write(state)
        return state

    def write(self, state: State) -> None:
        atomic.write_text(self.path, json.dumps(dataclasses.asdict(state)))

    def save(self, model: keras.Model, state: State) -> None:
        """Save ``model`` as the checkpoint of ``state.epoch`` and write ``state`` naming it."""
        state.model, state.rng = f"model-{state.epoch}", f"rng-{state.epoch}.npz"
        # written in place: until state.json names them, half-written files are never read
        shutil.rmtree(self.folder / state.model, ignore_errors=True)  # left by a run killed while saving
        model.save(self.folder / state.model, zipped=False)
        np.savez(self.folder / state.rng, **{f"s{i}": s for i, s in enumerate(rng_states(model))})
        self.write(state)
        for old in [*self.folder.glob("model-*"), *self.folder.glob("rng-*.npz")]:
            if old.name not in (state.model, state.rng):
                shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)

    def load_model(self, state: State) -> keras.Model:
        model = keras.models.load_model(self.folder / state.model)
        with np.load(self.folder / state.rng) as rng:
            restore_rng_states(model, [rng[f"s{i}"] for i in range(len(rng.files))])
        return model

    def export(self, state: State, dest: Path) -> None:
        """The checkpointed model as a zipped ``.keras`` file at ``dest``: the
        files of its folder zipped as Keras zips them (the same members,
        stored), streamed from disk, so the model is not serialized a second
        time with its weights held in memory."""
        source = self.folder / state.model
        with zipfile.ZipFile(dest, "w") as archive:
            for path in sorted(path for path in source.rglob("*") if path.is_file()):
                archive.write(path, path.relative_to(source).as_posix())

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
