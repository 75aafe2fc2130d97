"""DVC stage ``train@<experiment>``: fit a Keras model, tracked in MLflow.

Writes ``models/<experiment>/model.keras``, ``history.json`` and ``run.json``
(the MLflow run id, which the evaluate stage logs into, and where, with what
and how long the model was trained). One ``model.fit`` trains every epoch,
each over the permutation seeded from ``(seed, epoch)``
(:mod:`stages.feeder`); its callbacks (:mod:`stages.callbacks`)
stop at a NaN loss, checkpoint to ``checkpoints/<experiment>/`` at most once
every ``training.checkpoint_interval_s`` seconds and after the last epoch,
and send each epoch's metrics (and, at a few epochs, reconstructions or
predictions of fixed validation images) to MLflow. The run also gets its
data as dataset inputs, system metrics, and the model as a LoggedModel. A run
that was killed resumes from its last checkpoint (:mod:`stages.checkpoint`)
when the stage runs again and ends with the same weights as an
uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

from stages.keras_start import keras  # before any other import of Keras: see there

from stages import atomic, cli, distribution, params as params_mod, provenance
from stages.callbacks import Checkpointing, EpochLog, History, ImageLog, LetGo, MlflowMetrics, NanGuard
from stages.checkpoint import Checkpoint, State, fingerprint, folder_for
from stages.experiment_data import Arrays, ExperimentData, data_path, split_files
from stages.experiment_params import Experiment
from stages.feeder import fit_data
from stages.images import to_unit_float
from stages.mlflow_run import (MetricLog, abandon, flatten, log_keras_model, log_split, run_tags,
                               save_run_ref, system_metrics_wanted, tracked_run)
from stages.mlflow_store import EXPERIMENTS, TrackingError, describe_failure, failures, tracking_label
from stages.training import compiled_model, configure_backend, epochs_for

log = logging.getLogger("stages.train")


def fit(name: str, exp: Experiment, train: Arrays, val: Arrays, model: keras.Model, start: int, epochs: int,
        callbacks: list, guard: NanGuard, placement: distribution.Placement = distribution.ONE) -> None:
    """Train epochs ``start..epochs-1`` in one ``model.fit``. The images are
    let go at the last epoch's end, before ``callbacks`` run for it; on
    TensorFlow, which holds its own copy, before training starts."""
    batch_size, image_targets = exp.training.batch_size, exp.task == "autoencoder"
    left_out = [count - placement.usable_rows(count, batch_size) for count in (len(train), len(val))]
    if any(left_out):
        log.warning("train %s: the last batch must split evenly over %d devices: %d of the training images (a "
                    "different few each epoch) and %d of the validation images are left out of every epoch",
                    name, placement.replicas, *left_out)
    per_epoch = placement.batches(len(train), batch_size)
    if exp.training.data_on_device:
        log.info("train %s: %d train and %d validation images copied to the device (%s)",
                 name, len(train), len(val), keras.backend.backend())
    batches, validation, holders = fit_data(train, val, batch_size, image_targets, exp.training.seed, start, epochs,
                                            placement, exp.training.data_on_device)
    try:
        model.fit(batches, epochs=epochs, initial_epoch=start, steps_per_epoch=per_epoch, shuffle=False,
                  validation_data=validation, callbacks=[guard, LetGo(epochs, holders), *callbacks],
                  verbose=1 if sys.stderr.isatty() else 0)  # Keras' bar on a terminal; our line per epoch always
    finally:
        for holder in holders:
            holder.release()
    guard.check(name)


def start_point(checkpoint: Checkpoint, placement: distribution.Placement) -> tuple[State | None, str | None]:
    """The state to resume from (None: start afresh) and the run id of a stale
    one (other params or data), whose MLflow run nobody will continue."""
    state = checkpoint.read()
    if checkpoint.resumable(state):
        return state, None
    stale = state.run_id if state and not state.complete else None
    if placement.chief:  # the others only read: process 0's checkpoints are the ones
        if stale:
            log.info("checkpoint in %s is for other params or data; starting afresh", checkpoint.folder)
        checkpoint.clear()
    return None, stale


def describe(name: str, exp: Experiment, epochs: int, data: ExperimentData, arrays: tuple[Arrays, Arrays],
             inputs: list[str], placement: distribution.Placement) -> None:
    """The run's params, tags and dataset inputs (logged once per run)."""
    import mlflow

    config = exp.model_dump(mode="json")
    with failures(f"train {name}"):
        mlflow.log_params({**flatten(config), "epochs_run": epochs, "dataset_source": data.source,
                           "train_samples": len(arrays[0]), "val_samples": len(arrays[1]),
                           "replicas": placement.replicas, "processes": placement.processes})
        mlflow.set_tags(run_tags(f"train@{name}", inputs, task=exp.task, experiment=name,
                                 params_hash=provenance.params_hash(config),
                                 **{f"env.{k}": v for k, v in provenance.environment().items()}))
        for context, split in zip(("training", "validation"), arrays):
            log_split(context, split_files(exp.data.input, exp.data.target, split))


def save_outputs(out: Path, exported: Path, history: dict, run, model_id: str, trained: dict) -> None:
    """``model.keras`` (``exported``, moved), ``history.json`` and ``run.json``."""
    with atomic.replacing(out, directory=True) as folder:
        shutil.move(exported, folder / "model.keras")
        (folder / "history.json").write_text(json.dumps(history, indent=2) + "\n")
        save_run_ref(folder / "run.json", run.info.run_id, run.info.experiment_id,
                     {**trained, **provenance.environment(), **provenance.git_state()}, model_id=model_id)


def log_results(name: str, model: keras.Model, exported: Path, example, history: dict, epochs: int,
                metric_log: MetricLog, checkpoint: Checkpoint, state: State, placement: distribution.Placement) -> str:
    """The epochs' metrics the store does not have yet, then the model (its
    ``.keras`` file ``exported``) as a LoggedModel (once: a re-run after a
    failure here reuses it); its id."""
    try:
        metric_log.flush(history, epochs, required=True)
        state.logged = metric_log.logged
        checkpoint.write(state)
        if state.model_id is None:
            with placement.alone():
                state.model_id = log_keras_model(model, example, name, exported)  # named after the experiment
            checkpoint.write(state)
        return state.model_id
    except Exception as exc:  # noqa: BLE001 - the store failed; the trained model is safe
        raise TrackingError(
            f"train {name}: the {epochs} epochs are trained and saved in {checkpoint.folder}, but the MLflow "
            f"store {tracking_label()} failed ({describe_failure(exc)}); run the stage again when it "
            "answers: it logs the run without training again") from None


def starting_model(name: str, exp: Experiment, data: ExperimentData, train_arrays: Arrays, checkpoint: Checkpoint,
                   state: State | None, epochs: int, placement: distribution.Placement) -> keras.Model:
    """The checkpointed model to resume, or a new compiled one."""
    start = state.epoch if state else 0
    # several processes train one model: they must start from the same params, data and weights
    placement.agree("the params and data (every host needs the same params.yaml and data files: dvc pull)",
                    checkpoint.fingerprint)
    placement.agree(f"the epoch to resume from ({checkpoint.folder}/ must be one shared folder, the same copy on "
                    "every host, or absent on every host)", start)
    steps = placement.batches(len(train_arrays), exp.training.batch_size)
    model = compiled_model(name, exp, train_arrays.x.shape[1:], len(data.class_names), steps, epochs, train_arrays.y)
    if start:
        log.info("train %s: resuming from checkpoint after epoch %d of %d", name, start, epochs)
        checkpoint.restore(model, state)
    return model


def tracked_training(name: str, exp: Experiment, data: ExperimentData, arrays: tuple[Arrays, Arrays],
                     model: keras.Model, checkpoint: Checkpoint, state: State | None, stale_run: str | None,
                     epochs: int, inputs: list[str], placement: distribution.Placement, out: Path,
                     started: float) -> dict:
    """Train inside the experiment's MLflow run (continued when ``state`` names
    one), log the model and write the outputs; returns the history."""
    start = state.epoch if state else 0
    with tracked_run(EXPERIMENTS[exp.task], f"train {name}", run_id=state and state.run_id, name=name,
                     system_metrics=system_metrics_wanted()) as run:
        if stale_run:
            abandon(stale_run)
        if state is None:
            state = checkpoint.start(run.info.run_id)  # from here on a killed training continues this run
        elif start == 0:
            log.info("train %s: continuing MLflow run %s, killed before its first checkpoint", name, state.run_id)
        if not state.described:
            describe(name, exp, epochs, data, arrays, inputs, placement)
            state.described = True
            checkpoint.write(state)
        history, guard = {key: list(values) for key, values in state.history.items()}, NanGuard()
        metric_log = MetricLog.continuing(run.info.run_id, state.logged)
        after = {"checkpoint": Checkpointing(guard, checkpoint, state, history, epochs,
                                             exp.training.checkpoint_interval_s, placement),
                 "tracking": MlflowMetrics(guard, metric_log, checkpoint, state, history)}
        if placement.replicas == 1 and len(arrays[1]):  # over several devices a prediction is every process's work
            after["images"] = ImageLog(guard, run.info.run_id, arrays[1], exp.task == "autoencoder", epochs, start)
        example = to_unit_float(arrays[0].x[:4])  # before fit, which lets the images go
        fit_started = time.perf_counter()
        fit(name, exp, *arrays, model, start, epochs,
            [History(guard, history), *after.values(), EpochLog(name, epochs, after)], guard, placement)
        fit_s = time.perf_counter() - fit_started
        exported = checkpoint.model_file  # saved once: MLflow gets a copy, the output is this file
        with placement.alone():
            checkpoint.export(model, exported)
        model_id = log_results(name, model, exported, example, history, epochs, metric_log, checkpoint, state,
                               placement)
        # this process's share when it resumed a killed run (resumed_at_epoch > 0)
        with placement.alone():
            save_outputs(out, exported, history, run, model_id, {
                "epochs": epochs, "resumed_at_epoch": start, "seconds": round(time.perf_counter() - started, 1),
                "fit_seconds": round(fit_s, 1)})
    state.complete = True
    checkpoint.write(state)
    return history


def train(name: str, params: params_mod.Params, out: Path, checkpoints: Path) -> list[Path]:
    """Train experiment ``name``; returns the outputs written (none in a
    data-parallel process other than the chief: process 0 writes)."""
    started = time.perf_counter()
    exp = params_mod.experiment(params, name)
    data = ExperimentData(name, exp)
    train_arrays, val_arrays = data.training()
    epochs, t = epochs_for(exp, params.limits), exp.training
    with distribution.setup(t.distribution, t.batch_size, f"experiments.{name}.training") as placement:
        configure_backend(t.seed, t.mixed_precision)
        inputs = sorted({str(data_path(exp.data.input)), str(data_path(exp.data.target))})
        key = fingerprint(exp, epochs, inputs, len(train_arrays))
        checkpoint = Checkpoint(folder_for(name, checkpoints, key), key)
        state, stale_run = start_point(checkpoint, placement)
        model = starting_model(name, exp, data, train_arrays, checkpoint, state, epochs, placement)
        log.info("train %s: %s on %s (%s), train %s val %s, %d epochs, batch %d, backend %s, %d replica(s)",
                 name, exp.model.kind, exp.data.input, data.source, train_arrays.x.shape, val_arrays.x.shape,
                 epochs, t.batch_size, keras.backend.backend(), placement.replicas)
        if not placement.chief:  # trains its share of every batch; writes nothing
            guard = NanGuard()
            fit(name, exp, train_arrays, val_arrays, model, state.epoch if state else 0, epochs,
                [History(guard, {}), EpochLog(name, epochs, {})], guard, placement)
            log.info("train %s: process %d of %d done; process 0 writes the model, checkpoints and MLflow run",
                     name, placement.index, placement.processes)
            return []
        history = tracked_training(name, exp, data, (train_arrays, val_arrays), model, checkpoint, state, stale_run,
                                   epochs, inputs, placement, out, started)
    log.info("train %s: %s", name, {key: round(values[-1], 5) for key, values in history.items()})
    peak = distribution.device_peak_mib()
    if peak is not None:
        log.info("train %s: peak device memory %.0f MiB", name, peak)
    return [out]


def main(argv=None) -> int:
    def configure(parser):
        parser.add_argument("experiment", help="an experiment named under 'experiments' in params.yaml")
        parser.add_argument("--out", type=Path, help="output folder (default: models/<experiment>)")
        parser.add_argument("--checkpoints", type=Path, help="checkpoint folder (default: checkpoints/<experiment>; "
                            "with IMAGEPIPE_CHECKPOINTS set: <that>/<experiment>-<fingerprint of params and data>)")

    def body(args):
        params = params_mod.load(args.params)
        out = args.out or Path("models") / args.experiment
        return train(args.experiment, params, out, args.checkpoints or Path("checkpoints") / args.experiment)

    return cli.run("train", __doc__, body, configure, argv)


if __name__ == "__main__":
    raise SystemExit(main())
