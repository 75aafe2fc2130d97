"""The callbacks of the train stage's one ``model.fit``: the NaN guard, the
history, the checkpoint, the MLflow metrics and images, and the line per epoch.

They run in list order at each epoch's end; the checkpoint goes before the
MLflow metrics, so a store that does not answer never costs training."""

from __future__ import annotations

import logging
import math
import threading
import time

import keras
import numpy as np

from stages import distribution
from stages.checkpoint import Checkpoint, State
from stages.errors import PipelineError
from stages.images import tile, to_unit_float
from stages.mlflow_run import MetricLog
from stages.mlflow_store import describe_failure

log = logging.getLogger("stages.train")


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite."""


class NanGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss and remembers where.

    ``async_safe``: Keras then calls the batch hook from a thread pool, so the
    training loop does not wait for each batch's loss to reach the host (a
    sync per step on a GPU); a NaN stops training a few batches later at most,
    and the earliest batch that had one is the one reported. Keras waits for
    the batch hooks before the epoch's end, so the callbacks after this one
    know whether the epoch diverged."""

    async_safe = True

    def __init__(self):
        super().__init__()
        self.epoch = 0
        self.hit: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            with self._lock:
                self.hit = min(self.hit or (math.inf, math.inf), (self.epoch + 1, batch + 1))
            self.model.stop_training = True

    def check(self, name: str) -> None:
        if self.hit:
            raise TrainingDiverged(
                f"experiments.{name}: loss became NaN/inf at epoch {self.hit[0]}, batch {self.hit[1]}; "
                "lower training.learning_rate or check the data; no model was written")


class LetGo(keras.callbacks.Callback):
    """At the last epoch's end, before the checkpoint and the saves after
    training, releases the images (each of ``holders`` has ``release()``)."""

    def __init__(self, epochs: int, holders: tuple):
        super().__init__()
        self.epochs, self.holders = epochs, holders

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            for holder in self.holders:
                holder.release()


class EpochEnd(keras.callbacks.Callback):
    """Base of the callbacks below: does nothing for an epoch that diverged."""

    def __init__(self, guard: NanGuard):
        super().__init__()
        self.guard, self.seconds = guard, 0.0

    def on_epoch_end(self, epoch, logs=None):
        started = time.perf_counter()
        if not self.guard.hit:
            self.epoch_done(epoch, {key: float(value) for key, value in (logs or {}).items()})
        self.seconds = time.perf_counter() - started

    def epoch_done(self, epoch: int, logs: dict[str, float]) -> None:
        raise NotImplementedError


class History(EpochEnd):
    """Appends each epoch's metrics to ``history`` (a resumed run's holds the earlier epochs)."""

    def __init__(self, guard: NanGuard, history: dict[str, list[float]]):
        super().__init__(guard)
        self.history = history

    def epoch_done(self, epoch, logs):
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)


class Checkpointing(EpochEnd):
    """Saves a checkpoint after an epoch once ``interval_s`` have passed since
    the last one, and after the last epoch."""

    def __init__(self, guard: NanGuard, checkpoint: Checkpoint, state: State, history: dict[str, list[float]],
                 epochs: int, interval_s: float, placement: distribution.Placement):
        super().__init__(guard)
        self.checkpoint, self.state, self.history = checkpoint, state, history
        self.epochs, self.interval_s, self.placement = epochs, interval_s, placement
        self.last = time.perf_counter()

    def epoch_done(self, epoch, logs):
        if epoch + 1 < self.epochs and time.perf_counter() - self.last < self.interval_s:
            return
        self.state.epoch = epoch + 1
        self.state.history = {key: list(values) for key, values in self.history.items()}
        with self.placement.alone():
            self.checkpoint.save(self.model, self.state, keep_spare=epoch + 1 < self.epochs)
        self.last = time.perf_counter()


class MlflowMetrics(EpochEnd):
    """Sends the epochs' metrics to the run; what the store does not take
    now goes with a later epoch (:class:`stages.mlflow_run.MetricLog`)."""

    def __init__(self, guard: NanGuard, metric_log: MetricLog, checkpoint: Checkpoint, state: State,
                 history: dict[str, list[float]]):  # the live history (the state's is the checkpointed epochs')
        super().__init__(guard)
        self.metric_log, self.checkpoint, self.state, self.history = metric_log, checkpoint, state, history

    def epoch_done(self, epoch, logs):
        if self.metric_log.flush(self.history, epoch + 1):
            self.state.logged = self.metric_log.logged
            self.checkpoint.write(self.state)


def image_epochs(epochs: int, count: int = 5) -> set[int]:
    """The epochs (1-based) at which images are logged: the first, the last and
    up to ``count - 2`` evenly spaced between."""
    if epochs <= count:
        return set(range(1, epochs + 1))
    return {1 + round(i * (epochs - 1) / (count - 1)) for i in range(count)}


class ImageLog(EpochEnd):
    """The model's output on a fixed sample of validation images, as an MLflow
    image (``mlflow.log_image`` with ``step`` = epoch) at a few epochs
    (:func:`image_epochs`), so the MLflow UI steps through training and
    compares runs. An autoencoder's: its input, (the target, where it is not
    the input) and output rows; a classifier's: the images framed green
    where the prediction is right, red where it is wrong. A store that fails
    is logged and training goes on."""

    COLOURS = np.array([[214, 39, 40], [44, 160, 44]], np.uint8)  # wrong, right
    SAMPLE = 10  # the first validation images

    def __init__(self, guard: NanGuard, run_id: str, validation, autoencoder: bool, epochs: int, done: int = 0):
        super().__init__(guard)
        self.run_id, self.autoencoder = run_id, autoencoder
        # copies: the training arrays are let go at the end
        self.x, self.y = np.array(validation.x[:self.SAMPLE]), np.array(validation.y[:self.SAMPLE])
        self.rows = [self.x] if not autoencoder or np.array_equal(self.x, self.y) else [self.x, self.y]
        self.steps = {step for step in image_epochs(epochs) if step > done}

    def picture(self) -> np.ndarray:
        output = np.asarray(keras.ops.convert_to_numpy(self.model.predict_on_batch(to_unit_float(self.x))),
                            np.float32)
        if self.autoencoder:
            return tile([*self.rows, np.clip(output, 0, 1)])
        return tile([self.x], frames=self.COLOURS[(output.argmax(axis=1) == self.y).astype(int)])

    def epoch_done(self, epoch, logs):
        if epoch + 1 not in self.steps:
            return
        from mlflow import MlflowClient

        key = "reconstructions" if self.autoencoder else "predictions"
        try:
            MlflowClient().log_image(self.run_id, self.picture(), key=key, step=epoch + 1)
        except Exception as exc:  # noqa: BLE001 - a store failure costs this image, not the training
            log.warning("MLflow image %s of epoch %d not logged: %s", key, epoch + 1, describe_failure(exc))


class EpochLog(keras.callbacks.Callback):
    """One line per epoch: its training time, then the time the callbacks
    ``after`` took (checkpoint, tracking), and its metrics."""

    def __init__(self, name: str, epochs: int, after: dict[str, EpochEnd]):
        super().__init__()
        self.name, self.epochs, self.after = name, epochs, after
        self.started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        spent = {what: callback.seconds for what, callback in self.after.items()}
        took = time.perf_counter() - self.started - sum(spent.values())
        then = ", ".join(f"{what} {seconds:.3f} s" for what, seconds in spent.items())
        log.info("train %s: epoch %d/%d in %.2f s%s: %s", self.name, epoch + 1, self.epochs, took,
                 f" (then {then})" if then else "", " ".join(f"{k} {float(v):.5g}" for k, v in (logs or {}).items()))
