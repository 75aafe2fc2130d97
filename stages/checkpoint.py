"""``checkpoints/<experiment>/``: where a killed training resumes from.

``state.json`` holds a :class:`State`. A checkpoint is one ``.npz`` file:
every variable of the model (weights, batch-norm statistics, the seed
generators' states, so dropout masks and augmentation continue as in an
uninterrupted run) and of its optimizer, streamed to disk one variable at a
time from the backend's own memory (no copy of the model in NumPy, and none
of the h5 writer's work). The model itself is not saved: a resumed run
builds it from the same params (the fingerprint says so) and the variables
are read into it, each checked for its shape.

Two files take turns, ``variables-a.npz`` and ``variables-b.npz``: a
checkpoint overwrites, in place, the one ``state.json`` does not name, then
``state.json`` is replaced atomically to name it. Whenever the process is
killed, ``state.json`` names a complete file. Overwriting in place, where
writing a new file would allocate it afresh, keeps the file's pages in the
page cache from one checkpoint to the next: on a VM where memory touched for
the first time is slow, a 155 MB checkpoint took 0.2-0.55 s once both
files existed (1.3-1.8 s the first time into each), where a new file and
NumPy copies took 2-3 s (docs/benchmarks.md). After the last epoch the
spare file is removed, and the trained model is exported once to
``model.keras`` here (:attr:`Checkpoint.model_file`), from where MLflow gets
a copy and the stage's output takes it. A state is used only for the same params and data (its
fingerprint) and only while its run is not complete.

With ``IMAGEPIPE_CHECKPOINTS`` set (a folder every machine reaches, such as
a network share), the folder is ``<that>/<experiment>-<fingerprint>``
instead: a training retried on another machine, in another clone of the
project, resumes where the killed one left off, and runs of the same
experiment with other params (the points of a sweep) never share one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from stages import atomic, provenance
from stages.errors import PipelineError
from stages.experiment_params import Experiment

SLOTS = ("variables-a.npz", "variables-b.npz")  # the two files checkpoints take turns in
SHARED = "IMAGEPIPE_CHECKPOINTS"  # a shared checkpoint root, keyed by fingerprint (see the module's docstring)


@dataclass
class State:
    fingerprint: str  # of the params, data and epochs the run trains for
    run_id: str  # the MLflow run, continued on resume
    epoch: int = 0  # epochs in the saved variables; 0: none saved yet (the run exists)
    history: dict[str, list[float]] = field(default_factory=dict)  # per-epoch metrics up to ``epoch``
    logged: int = 0  # epochs whose metrics MLflow has (may run ahead of ``epoch``)
    described: bool = False  # the run's params and tags are logged
    complete: bool = False  # trained, exported and logged: nothing to resume
    model_id: str | None = None  # the MLflow LoggedModel, once logged
    variables: str | None = None  # the file of the variables of epoch ``epoch``, when epoch > 0


def fingerprint(exp: Experiment, epochs: int, inputs: list[str], samples: int) -> str:
    """What a checkpoint must have been made with to be resumed: the results'
    params (not the checkpoint interval, which changes none), epochs and data."""
    config = exp.model_dump(mode="json")
    config["training"].pop("checkpoint_interval_s")
    return provenance.params_hash({"config": config, "epochs": epochs, "data": provenance.data_hashes(inputs),
                                   "samples": samples})


def folder_for(name: str, given: Path, fingerprint: str) -> Path:
    """``given``, or ``<IMAGEPIPE_CHECKPOINTS>/<name>-<fingerprint>`` when that is set."""
    shared = os.environ.get(SHARED)
    return Path(shared).expanduser() / f"{name}-{fingerprint}" if shared else given


def all_variables(model: keras.Model) -> list:
    """The model's variables, then its optimizer's: everything a resumed run needs."""
    return [*model.variables, *model.optimizer.variables]


def host_array(variable) -> np.ndarray:
    """``variable``'s value as a NumPy array, sharing the backend's memory
    where it can (a tensor on the CPU): a read-only view that the caller lets
    go before the variable next changes (TensorFlow would copy a variable
    still viewed when the optimizer updates it)."""
    value = variable.value
    read = getattr(value, "read_value", None)  # a tf.Variable: its tensor, whose NumPy view is the buffer itself
    return np.asarray(read() if read is not None else value)


def write_variables(variables: list, path: Path) -> None:
    """``variables`` into an ``.npz`` file (read by ``np.load``), one at a
    time. An existing file is overwritten in place (its pages reused), then
    cut to the new length."""
    with open(path, "r+b" if path.exists() else "wb") as file:
        with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for index, variable in enumerate(variables):
                array = np.asarray(host_array(variable), order="C")  # (ascontiguousarray would make a 0-d array 1-d)
                with archive.open(f"v{index}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_1_0(member, np.lib.format.header_data_from_array_1_0(array))
                    member.write(array.reshape(-1).view(np.uint8))
        file.truncate()


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def read_variables(variables: list, path: Path) -> None:
    """``path``'s arrays into ``variables``, after checking that every one fits."""
    changed = f"the model's code changed since {path} was saved (remove {path.parent} to start afresh)"
    with np.load(path) as saved:
        if len(saved.files) != len(variables):
            raise PipelineError(f"{path}: holds {len(saved.files)} variables, the model has {len(variables)}: "
                                f"{changed}")
        for index, variable in enumerate(variables):  # the shapes first, from the headers: nothing assigned to a misfit
            with saved.zip.open(f"v{index}.npy") as member:
                shape = _NPY_HEADERS[np.lib.format.read_magic(member)](member)[0]
            if tuple(variable.shape) != shape:
                raise PipelineError(f"{path}: variable {variable.path} is {shape} there and "
                                    f"{tuple(variable.shape)} in the model: {changed}")
        for index, variable in enumerate(variables):  # then the arrays, one at a time
            variable.assign(saved[f"v{index}"])


class Checkpoint:
    """The checkpoint folder of one experiment, for runs of ``fingerprint``."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder, self.fingerprint = folder, fingerprint
        self.path = folder / "state.json"
        self.model_file = folder / "model.keras"  # the trained model, exported once (:meth:`export`)

    def read(self) -> State | None:
        """The folder's state, whatever its fingerprint; None if there is none (or it is unreadable)."""
        try:
            saved = json.loads(self.path.read_text())
            known = {f.name for f in dataclasses.fields(State)}  # one written by an older version may hold more
            return State(**{key: value for key, value in saved.items() if key in known})
        except (OSError, ValueError, TypeError, AttributeError):
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

    def save(self, model: keras.Model, state: State, keep_spare: bool = True) -> None:
        """Save ``model``'s variables as the checkpoint of ``state.epoch``, in
        the file ``state.json`` does not name, and write ``state`` naming it.
        Without ``keep_spare`` (the last checkpoint of a run) the other file goes."""
        target = SLOTS[1] if state.variables == SLOTS[0] else SLOTS[0]
        write_variables(all_variables(model), self.folder / target)
        state.variables = target
        self.write(state)
        for old in self.folder.glob("variables-*.npz"):  # an older version's, named by epoch; the spare when done
            if old.name != target and (old.name not in SLOTS or not keep_spare):
                old.unlink(missing_ok=True)

    def restore(self, model: keras.Model, state: State) -> keras.Model:
        """``model`` (compiled, built from the params of ``state``) with the variables of ``state.epoch``."""
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        read_variables(all_variables(model), self.folder / state.variables)
        return model

    def export(self, model: keras.Model, dest: Path) -> None:
        """``model`` as a zipped ``.keras`` file at ``dest``: saved unzipped
        (the weights go to disk as they are written, where a zipped save first
        holds them all in memory) and zipped as Keras zips it (the same
        members, stored), streamed from disk."""
        source = self.folder / "export"
        shutil.rmtree(source, ignore_errors=True)
        model.save(source, zipped=False)
        with zipfile.ZipFile(dest, "w") as archive:
            for path in sorted(path for path in source.rglob("*") if path.is_file()):
                archive.write(path, path.relative_to(source).as_posix())
        shutil.rmtree(source)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
