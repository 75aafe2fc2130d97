"""An MLflow run's life: started or resumed, described, fed metrics, ended.

Every stage that logs (train, evaluate, report) does so inside
:func:`tracked_run`, which starts a run (or continues one, by id) and ends it
FINISHED when the block completes, FAILED when it raises, KILLED when it is
interrupted; a store that fails on the way in or out is a one-line
:class:`~stages.mlflow_store.TrackingError`.

MLflow records the source commit itself (``mlflow.source.git.commit``); a
run's tags add what it lacks: the working tree's dirty flag, the DVC
experiment name (``DVC_EXP_NAME``, set by ``dvc exp run``), the stage, the
md5 of each input as ``dvc.lock`` records it, a hash of the params and the
machine and versions (:mod:`stages.provenance`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stages import atomic, provenance
from stages.mlflow_store import TrackingError, connect, describe_failure, failures, tracking_label

log = logging.getLogger(__name__)

GIT_COMMIT_TAG = "mlflow.source.git.commit"


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested params -> {"a.b.c": "value"} for MLflow (which takes flat string params)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def run_tags(stage: str, data: list[str] = (), **extra: str) -> dict[str, str]:
    """The tags MLflow has no field for (see the module's docstring), plus ``extra``."""
    git = provenance.git_state()
    tags = {"stage": stage, "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""), "git_dirty": git["git_dirty"],
            **{f"data_md5.{path}": md5 for path, md5 in provenance.data_hashes(list(data)).items()}, **extra}
    if os.environ.get(provenance.SOURCE_COMMIT):  # a copy of the tree: MLflow's own reading would be wrong
        tags[GIT_COMMIT_TAG] = git["git_commit"]
    return tags


def _start(run_id: str | None, name: str | None, system_metrics: bool):
    import mlflow

    try:
        return mlflow.start_run(run_id=run_id, run_name=None if run_id else name,
                                log_system_metrics=system_metrics)
    except mlflow.exceptions.MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise TrackingError(
                f"MLflow run {run_id} for '{name}' cannot be continued in {tracking_label()}: "
                f"{describe_failure(exc)}. Was it logged to another tracking URI?") from None
        action = f"continue run {run_id}" if run_id else "start a run"
        raise TrackingError(f"MLflow store {tracking_label()}: cannot {action} for '{name}': "
                            f"{describe_failure(exc)}") from None


@contextmanager
def tracked_run(experiment: str, what: str, *, run_id: str | None = None, name: str | None = None,
                pending: Path | None = None, system_metrics: bool = False) -> Iterator:
    """The active MLflow run of the block, in MLflow experiment ``experiment``:
    run ``run_id`` continued, or a new run named ``name``.

    Ends FINISHED, FAILED (the block raised) or KILLED (interrupted); ending
    after a failure is best effort (the store may be the cause). ``pending``:
    a marker file naming the open run, so that a run whose process was killed
    with no chance to end it is marked KILLED by the next one (:class:`PendingRun`).
    ``what`` names the stage in errors; ``system_metrics``: MLflow samples the
    machine's CPU, memory (and GPU) use into the run while the block runs."""
    import mlflow

    connect(experiment)
    marker = PendingRun(pending) if pending else None
    if marker:
        marker.reap()
    run = _start(run_id, name, system_metrics)
    if marker:
        marker.hold(run.info.run_id)
    try:
        yield run
    except (KeyboardInterrupt, SystemExit):
        end_quietly("KILLED")
        raise
    except BaseException:
        end_quietly("FAILED")
        raise
    else:
        with failures(what):
            mlflow.end_run()
    finally:
        if marker:
            marker.release()


def system_metrics_wanted() -> bool:
    """MLflow's system metrics (CPU, memory, disk, network; GPU with ``nvidia-ml-py``)
    for a training run: on unless MLflow's ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` is false."""
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").strip().lower() not in ("false", "0", "no")


def end_quietly(status: str) -> None:
    """End the active run as ``status`` if the store answers; a failure is only logged."""
    import mlflow

    try:
        mlflow.end_run(status=status)
    except Exception as exc:  # noqa: BLE001 - already failing; the store may be the cause
        log.warning("MLflow run not marked %s: %s", status, describe_failure(exc))


def abandon(run_id: str, what: str = "an interrupted training with other params or data") -> None:
    """Mark a run left RUNNING by a process that is gone, and that nobody will continue, as KILLED."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
            log.info("MLflow run %s of %s stage marked KILLED", run_id, what)
    except Exception as exc:  # noqa: BLE001 - best effort: it may live in another store
        log.info("MLflow run %s of %s stage not marked KILLED: %s", run_id, what, describe_failure(exc))


class PendingRun:
    """A marker file naming the run a stage has open, so that a run whose
    process was killed (and which nobody will continue) is marked KILLED by the
    next run of the stage instead of staying RUNNING forever."""

    def __init__(self, marker: Path):
        self.marker = marker

    def reap(self) -> None:
        try:
            pending = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return
        if not atomic.process_alive(int(pending.get("pid", 0))):
            abandon(pending["run_id"], "a killed")
            self.marker.unlink(missing_ok=True)

    def hold(self, run_id: str) -> None:
        atomic.write_text(self.marker, json.dumps({"run_id": run_id, "pid": os.getpid()}))

    def release(self) -> None:
        self.marker.unlink(missing_ok=True)


class MetricLog:
    """Per-epoch metrics of one run, sent in one request per flush.

    A store that does not answer does not stop training: the epochs stay in
    the history (and the checkpoint) and go with a later flush. After a
    failure the next try waits ``pause_s``, so an outage costs one timeout,
    not one per epoch. ``flush(..., required=True)`` raises instead.

    An epoch keeps the timestamp of its first try. A store that took a batch
    but whose answer was lost (a database restarted mid-request) is sent the
    same metrics again, which MLflow stores once: with a new timestamp each
    try, that epoch would be in the run twice.
    """

    def __init__(self, run_id: str, logged: int = 0, pause_s: float = 30.0):
        self.run_id, self.logged, self.pause_s = run_id, logged, pause_s
        self._retry_at = 0.0
        self._stamps: dict[int, int] = {}  # epoch -> milliseconds, for epochs not yet logged

    @classmethod
    def continuing(cls, run_id: str, logged: int) -> "MetricLog":
        """The log of a run that a training continues: the epochs the store
        already has of ``loss`` count as logged too. A process killed after
        sending an epoch but before saving that it had (a node going down)
        would otherwise send that epoch twice. A store that does not answer
        now leaves ``logged`` as the checkpoint says."""
        from mlflow.tracking import MlflowClient

        metric_log = cls(run_id, logged)
        try:
            steps = [m.step for m in MlflowClient().get_metric_history(run_id, "loss")]
        except Exception:  # noqa: BLE001 - the first flush meets the store's failure and says so
            return metric_log
        metric_log.logged = max([logged, *steps])
        return metric_log

    def flush(self, history: dict[str, list[float]], upto: int, required: bool = False) -> bool:
        """Send epochs ``logged+1..upto``; True if all of them are now logged."""
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        if self.logged >= upto:
            return True
        if not required and time.monotonic() < self._retry_at:
            return False
        now = int(time.time() * 1000)
        steps = range(self.logged + 1, upto + 1)
        stamps = {step: self._stamps.setdefault(step, now) for step in steps}
        batch = [Metric(key, float(values[step - 1]), stamps[step], step)
                 for step in steps for key, values in history.items()]
        try:
            for start in range(0, len(batch), 1000):  # MLflow's limit per log_batch
                MlflowClient().log_batch(self.run_id, metrics=batch[start:start + 1000], synchronous=True)
        except Exception as exc:  # noqa: BLE001 - any store failure: keep training, say so once
            reason = describe_failure(exc)
            if required:
                raise TrackingError(f"MLflow store {tracking_label()} did not take the metrics of run "
                                    f"{self.run_id}: {reason}") from None
            log.warning("MLflow store %s did not answer (%s); epochs %d-%d are kept and sent later",
                        tracking_label(), reason, self.logged + 1, upto)
            self._retry_at = time.monotonic() + self.pause_s
            return False
        self.logged = upto
        self._stamps = {step: stamp for step, stamp in self._stamps.items() if step > upto}
        return True


class _KerasFlavor:
    """``mlflow.keras`` as ``Model.log`` calls it, with the model folder created
    first: MLflow 3.17's Keras flavor writes the input example before it creates
    the folder, so ``mlflow.keras.log_model(..., input_example=...)`` fails
    (mlflow/mlflow#16183)."""

    __name__ = "mlflow.keras"  # the flavor MLflow records on the logged model

    @staticmethod
    def save_model(path: str, validate_serving_input: bool = False, **kwargs) -> None:
        import mlflow

        Path(path).mkdir(parents=True, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)


class _SavedModelFile:
    """Stands for the model in ``mlflow.keras.save_model``, whose one use of
    the model is ``model.save(path)``: this copies a ``.keras`` file saved
    already (:meth:`stages.checkpoint.Checkpoint.export` streams the weights
    to disk), where Keras' zipped save would first hold every weight in
    memory once more (155 MB for ``cifar10_cnn``, at the stage's peak)."""

    def __init__(self, file: Path):
        self.file = Path(file)

    def save(self, path: str, **kwargs) -> None:
        shutil.copyfile(self.file, path)


def log_keras_model(model, example, name: str, saved: Path | None = None) -> str:
    """Log the model as an MLflow LoggedModel ``name`` of the active run, with
    signature and input example; returns its model id (``models:/<id>``).
    ``saved``: the model's ``.keras`` file, if saved already (copied, not saved again)."""
    import keras
    import mlflow
    import numpy as np

    # the output's shape and dtype from the model's graph, not a prediction: with several processes a
    # prediction is a collective computation that the chief cannot run alone
    spec = model.compute_output_spec(keras.KerasTensor(example.shape, dtype=str(example.dtype)))
    signature = mlflow.models.infer_signature(example, np.zeros(spec.shape, dtype=spec.dtype))
    # no serving check of the example at logging (a reload and a prediction, with Keras' progress bar in
    # the stage's output): tests/test_serving.py serves logged models for real
    info = mlflow.models.Model.log(artifact_path=None, name=name, flavor=_KerasFlavor,
                                   model=model if saved is None else _SavedModelFile(saved),
                                   signature=signature, input_example=example, validate_serving_input=False,
                                   pip_requirements=[f"keras=={keras.__version__}"])
    return info.model_id


def dataset_input(name: str, path: str, arrays: dict, md5: str | None = None):
    """An MLflow dataset for ``mlflow.log_input``: ``name``, the file's DVC md5
    (from ``dvc.lock``; the file's own md5, which is the same for a binary
    file, where dvc.lock has none) as digest, the file as source, and the
    shape and dtype of each array as schema."""
    from mlflow.data.dataset_source_registry import get_registered_sources
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types.schema import Schema, TensorSpec

    md5 = md5 or provenance.file_md5(path)
    schema = Schema([TensorSpec(array.dtype, array.shape, key) for key, array in arrays.items()])
    local = next(source for source in get_registered_sources() if source._get_source_type() == "local")
    return MetaDataset(local(Path(path).resolve().as_uri()), name=name, digest=md5, schema=schema)


def log_split(context: str, files: dict[str, tuple[str, dict]]) -> None:
    """Log a split of the data a run used (``context``: training, validation
    or test) as MLflow dataset inputs named ``<ref>:<context>``, one per file
    (``{ref: (path, {key: array})}``, :func:`stages.experiment_data.split_files`)."""
    import mlflow

    hashes = provenance.data_hashes([path for path, _ in files.values()])
    for ref, (path, arrays) in files.items():
        mlflow.log_input(dataset_input(f"{ref}:{context}", path, arrays, hashes.get(path)), context=context)


def save_run_ref(path: Path, run_id: str, experiment_id: str, trained: dict | None = None,
                 model_id: str | None = None) -> None:
    """The DVC output that tells later stages (and people) which MLflow run
    this is, the model's LoggedModel id and, as ``trained``, how the model was
    trained: where (machine, backend, versions, commit), how many epochs and
    how long."""
    ref = {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": tracking_label()}
    if model_id is not None:
        ref["model_id"] = model_id
    if trained is not None:
        ref["trained"] = trained
    atomic.write_text(path, json.dumps(ref, indent=2) + "\n")


def load_run_ref(path: Path) -> dict:
    return atomic.read_json(path, "the train stage", TrackingError)
