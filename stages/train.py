"""DVC stage ``train@<experiment>``: fit a Keras model, tracked in MLflow.

Writes ``models/<experiment>/model.keras``, ``history.json`` and ``run.json``
(the MLflow run id, which the evaluate stage logs into). Training runs one
``model.fit`` epoch at a time over a permutation seeded from
``(seed, epoch)``, and after an epoch (at most one every
``training.checkpoint_interval_s`` seconds, and after the last) saves a
checkpoint to ``checkpoints/<experiment>/`` (model with optimizer state, the
layers' RNG states, the history and the MLflow run id), written atomically.
A run that was killed resumes from its last checkpoint when the stage runs
again and ends with the same weights as an uninterrupted run. A checkpoint is
used only if it was made with the same params and data (a fingerprint says so).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import threading
import time
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF C++ chatter; errors still raise

import keras  # noqa: E402
import numpy as np  # noqa: E402

from stages import atomic, cli, distribution, metrics, params as params_mod, recipes, tracking  # noqa: E402
from stages.errors import PipelineError  # noqa: E402
from stages.experiment_data import Arrays, ExperimentData, data_path  # noqa: E402
from stages.experiment_params import Experiment  # noqa: E402
from stages.images import UNIT_SCALE, to_unit_float  # noqa: E402
from stages.models import (LINEAR_ENCODER, build_any_autoencoder, build_any_classifier,  # noqa: E402
                           has_linear_path, init_linear_path)

log = logging.getLogger("stages.train")

LOSSES = {"mse": "mean_squared_error", "bce": "binary_crossentropy",
          "sparse_categorical_crossentropy": "sparse_categorical_crossentropy"}


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite."""


class NanGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss and remembers where.

    ``async_safe``: Keras then calls the batch hook from a thread pool, so the
    training loop does not wait for each batch's loss to reach the host (a
    sync per step on a GPU); a NaN stops training a few batches later at most,
    and the earliest batch that had one is the one reported.
    """

    async_safe = True

    def __init__(self):
        super().__init__()
        self.epoch = 0
        self.hit: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch  # batch hooks of the previous epoch have all run (Keras waits at epoch end)

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            with self._lock:
                self.hit = min(self.hit or (math.inf, math.inf), (self.epoch + 1, batch + 1))
            self.model.stop_training = True


def configure_backend(seed: int, mixed_precision: bool) -> None:
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # the one backend switch: deterministic kernels on TF

        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if mixed_precision else "float32")


def one_op_at_a_time() -> bool:
    """On TensorFlow without a GPU, run one op at a time (each op still uses
    every core) unless ``TF_NUM_INTEROP_THREADS`` is set (``0``: TensorFlow's
    own choice). With two at a time the ops' buffers overlap at random:
    ``train@cifar10_cnn`` peaked at 2,091-2,188 MiB over four runs, one at a
    time at 1,979-1,980 MiB in two, at the same speed (docs/benchmarks.md).
    Must run before TensorFlow starts its runtime; True if it set the limit."""
    if keras.backend.backend() != "tensorflow" or "TF_NUM_INTEROP_THREADS" in os.environ:
        return False
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return False
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # the runtime has started (an earlier model in this process): left as it is
        return False
    return True


def optimizer_for(t, total_steps: int) -> keras.optimizers.Optimizer:
    """The optimizer ``training`` names, at its constant rate or on its schedule
    over ``total_steps``; unset options keep Keras' defaults."""
    options = {}
    if t.gradient_accumulation_steps:  # a schedule still counts every batch: total_steps are batches
        options["gradient_accumulation_steps"] = t.gradient_accumulation_steps
    if t.learning_rate is not None:
        options["learning_rate"] = recipes.schedule(t.schedule, t.learning_rate, total_steps, t.warmup)
    if t.optimizer == "sgd":
        options.update(momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay)
    elif t.optimizer == "adamw" and t.weight_decay is not None:
        options["weight_decay"] = t.weight_decay
    kinds = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW, "rmsprop": keras.optimizers.RMSprop,
             "sgd": keras.optimizers.SGD}
    return kinds[t.optimizer](**options)


def loss_for(t, num_classes: int):
    if t.label_smoothing:
        return recipes.SmoothedSparseCrossentropy(t.label_smoothing, num_classes)
    if t.loss == "psnr":  # floored like evaluate's PSNR, so the loss is minus the figure it reports
        return recipes.NegativePsnr(metrics.MSE_FLOOR)
    return LOSSES[t.loss]


def build(name: str, exp: Experiment, image_shape, num_classes: int, steps_per_epoch: int, epochs: int,
          train_targets: np.ndarray | None = None) -> keras.Model:
    """The compiled model; a ``linear_path`` autoencoder starts from the PCA of
    ``train_targets`` (uint8), fitted on the same images as evaluate's baseline."""
    try:
        if exp.task == "autoencoder":
            spec = exp.model.spec()
            model, _ = build_any_autoencoder(spec, image_shape)
            if has_linear_path(spec):
                if train_targets is None:
                    raise ValueError("linear_path needs the training images to fit its PCA")
                mean, vectors = metrics.pca_fit(train_targets, model.get_layer(LINEAR_ENCODER).units)
                init_linear_path(model, mean, vectors)
        else:
            model = build_any_classifier(exp.model.spec(num_classes), image_shape)
    except ValueError as exc:  # the model does not fit these images (sizes known only after prepare)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"experiments.{name}.model does not fit {exp.data.input}'s "
                            f"{'x'.join(map(str, image_shape))} images: {first}") from None
    t = exp.training
    model.compile(optimizer=optimizer_for(t, steps_per_epoch * epochs), loss=loss_for(t, num_classes),
                  metrics=list(t.metrics),
                  jit_compile=t.jit_compile, steps_per_execution=t.steps_per_execution)
    return model


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
    """``checkpoints/<experiment>/``: ``state.json`` and the files it names.

    The model (with optimizer state) and the layers' RNG states of epoch *e*
    are written as ``model-<e>/`` (Keras' unzipped format: the weights go to
    disk as they are written, where a zipped ``.keras`` file first holds them
    all in memory, 250 MiB more at the peak of ``cifar10_cnn``) and
    ``rng-<e>.npz`` first, then ``state.json`` is replaced atomically to name
    them, then older ones are removed: whenever the process is killed,
    ``state.json`` names a complete pair or none (epoch 0, written when the
    MLflow run is created, so a run killed before its first checkpoint is
    continued rather than left RUNNING).
    Between checkpoints ``state.json``'s ``logged`` counts the epochs whose
    metrics MLflow has; a resumed run re-trains the epochs after the
    checkpoint (to the same values where the backend is deterministic, as
    TensorFlow here is) and does not log them twice.
    """

    def __init__(self, folder: Path, fingerprint: str):
        self.folder, self.fingerprint = folder, fingerprint
        self.path = folder / "state.json"

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def usable(self, state: dict | None) -> bool:
        """A state to resume from: same params and data, and not a finished run."""
        return (bool(state) and not state.get("complete") and state.get("fingerprint") == self.fingerprint
                and (state.get("epoch") == 0 or "model" in state))  # an older layout is not resumed

    def model(self, state: dict) -> keras.Model:
        model = keras.models.load_model(self.folder / state["model"])
        with np.load(self.folder / state["rng"]) as rng:
            restore_rng_states(model, [rng[f"s{i}"] for i in range(len(rng.files))])
        return model

    def _write_state(self, state: dict) -> None:
        atomic.write_text(self.path, json.dumps({**state, "fingerprint": self.fingerprint}))

    def start(self, run_id: str) -> dict:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"epoch": 0, "history": {}, "run_id": run_id, "logged": 0}
        self._write_state(state)
        return state

    def save(self, model: keras.Model, state: dict) -> None:
        epoch = state["epoch"]
        names = {"model": f"model-{epoch}", "rng": f"rng-{epoch}.npz"}
        # written in place: until state.json names them, half-written files are never read
        shutil.rmtree(self.folder / names["model"], ignore_errors=True)  # left by a run killed while saving
        model.save(self.folder / names["model"], zipped=False)
        np.savez(self.folder / names["rng"], **{f"s{i}": s for i, s in enumerate(rng_states(model))})
        self._write_state({**state, **names})
        for old in [*self.folder.glob("model-*"), *self.folder.glob("rng-*.npz")]:  # model-<e>.keras: older layout
            if old.name not in names.values():
                shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)

    def export(self, dest: Path) -> None:
        """The last checkpoint's model as a zipped ``.keras`` file at ``dest``:
        the files of its folder zipped as Keras zips them (the same members,
        stored), streamed from disk, so the model is not serialized a second
        time with its weights held in memory."""
        source = self.folder / self.read()["model"]
        if source.is_file():  # the older layout: a .keras file already
            shutil.copyfile(source, dest)
            return
        with zipfile.ZipFile(dest, "w") as archive:
            for path in sorted(path for path in source.rglob("*") if path.is_file()):
                archive.write(path, path.relative_to(source).as_posix())

    def update(self, **changes) -> None:
        self._write_state({**(self.read() or {}), **changes})

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def log_model(model: keras.Model, example: np.ndarray) -> None:
    """Log the model as the run's ``model`` artifact, with signature and input example.

    Saved through ``mlflow.keras.save_model`` into a folder created first:
    MLflow 3.17's ``log_model`` writes the input example before it creates the
    model folder and fails.
    """
    import tempfile

    import mlflow

    # the output's shape and dtype from the model's graph, not a prediction: with several processes a
    # prediction is a collective computation that the chief cannot run alone
    spec = model.compute_output_spec(keras.KerasTensor(example.shape, dtype=str(example.dtype)))
    signature = mlflow.models.infer_signature(example, np.zeros(spec.shape, dtype=spec.dtype))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        mlflow.keras.save_model(model, str(folder), signature=signature, input_example=example,
                                pip_requirements=[f"keras=={keras.__version__}"])
        mlflow.log_artifacts(str(folder), "model")


def epochs_for(exp: Experiment, limits) -> int:
    return min(exp.training.epochs, limits.max_epochs or exp.training.epochs)


class ScaledBatches(keras.utils.PyDataset):
    """The batches of ``arrays`` in ``order``, each gathered from the uint8
    arrays and scaled to float32 in [0, 1] when Keras asks for it: an epoch
    never holds more than one batch (and the prefetched ones) as floats.
    Targets are scaled too when they are images (an autoencoder's). The
    arrays may be NumPy or, with ``training.data_on_device``, backend
    tensors on the accelerator (``on_device``): batches are then made there.

    Data-parallel (``placement``): the order is cut so that the last batch
    splits over the devices, and a process of several yields only its share
    of each batch (:class:`stages.distribution.Placement`)."""

    def __init__(self, arrays: Arrays, order: np.ndarray, batch_size: int, image_targets: bool,
                 placement: distribution.Placement = distribution.ONE):
        super().__init__()
        order = order[:placement.usable_rows(len(order), batch_size)]
        self.arrays, self.order, self.batch_size, self.image_targets = arrays, order, batch_size, image_targets
        self.placement = placement

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def release(self) -> None:
        """Let go of the arrays and the order once ``fit`` is done with them.
        Keras on TensorFlow feeds a PyDataset through ``tf.data``'s
        ``from_generator``, whose generator TensorFlow keeps for the rest of
        the process: every epoch's batches would stay alive (the order alone
        is 8 bytes an image an epoch), and with them the images."""
        self.arrays = self.order = None

    def __getitem__(self, index: int):
        rows = self.placement.share(self.order[index * self.batch_size:(index + 1) * self.batch_size])
        x = gather_scaled(self.arrays.x, rows)
        if self.arrays.y is self.arrays.x:  # an autoencoder reconstructing its input: one gather, not two
            return x, x
        if self.image_targets:
            return x, gather_scaled(self.arrays.y, rows)
        return x, gather(self.arrays.y, rows)


def gather(array, rows: np.ndarray):
    """``array[rows]``, for a NumPy array or a backend tensor (``on_device``)."""
    return array[rows] if isinstance(array, np.ndarray) else keras.ops.take(array, rows, axis=0)


def gather_scaled(images, rows: np.ndarray):
    """``to_unit_float(images[rows])``; for uint8 images already on the
    device (a backend tensor, see ``on_device``) gathered and scaled there,
    with the same float32 product, so the batch is bit for bit the same."""
    if isinstance(images, np.ndarray):
        return to_unit_float(images[rows])
    return keras.ops.multiply(keras.ops.cast(gather(images, rows), "float32"), UNIT_SCALE)


def on_device(arrays: Arrays) -> Arrays:
    """``arrays`` copied once to the default device (the accelerator if there
    is one) as backend tensors of the same dtypes; an array that is both
    input and target stays one tensor."""
    x = keras.ops.convert_to_tensor(arrays.x)
    y = x if arrays.y is arrays.x else keras.ops.convert_to_tensor(arrays.y)
    return Arrays(x, y)


def fit(name: str, exp: Experiment, train: Arrays, val: Arrays, model: keras.Model, start: int, epochs: int,
        history: dict, on_epoch, placement: distribution.Placement = distribution.ONE) -> dict:
    """Train epochs ``start..epochs-1``; call ``on_epoch(epoch, logs)`` after
    each one, which returns the seconds its checkpoint and its tracking took
    (logged with the epoch's own time); None in a process that writes
    neither. ``train`` and ``val`` are released once the last epoch is
    trained, before its ``on_epoch``: the checkpoint and the saves after
    training run without the images in memory."""
    batch_size, image_targets = exp.training.batch_size, exp.task == "autoencoder"
    left_out = [count - placement.usable_rows(count, batch_size) for count in (len(train), len(val))]
    if any(left_out):
        log.warning("train %s: the last batch must split evenly over %d devices: %d of the training images (a "
                    "different few each epoch) and %d of the validation images are left out of every epoch",
                    name, placement.replicas, *left_out)
    given = (train, val)
    if exp.training.data_on_device:
        train, val = on_device(train), on_device(val)
        log.info("train %s: %d train and %d validation images copied to the device (%s)",
                 name, len(train), len(val), keras.backend.backend())
    validation = ScaledBatches(val, np.arange(len(val)), batch_size, image_targets, placement)
    guard = NanGuard()
    verbose = 1 if sys.stderr.isatty() else 0  # Keras' bar on a terminal; our line per epoch always
    try:
        for epoch in range(start, epochs):
            started = time.perf_counter()
            order = np.random.default_rng([exp.training.seed, epoch]).permutation(len(train))
            batches = ScaledBatches(train, order, batch_size, image_targets, placement)
            try:
                result = model.fit(batches, epochs=epoch + 1, initial_epoch=epoch, shuffle=False,
                                   validation_data=validation, callbacks=[guard], verbose=verbose)
            finally:
                batches.release()
            if epoch + 1 == epochs:
                for arrays in (*given, train, val):  # the caller's, and their device copies
                    arrays.release()
            if guard.hit:
                raise TrainingDiverged(
                    f"experiments.{name}: loss became NaN/inf at epoch {guard.hit[0]}, batch {guard.hit[1]}; "
                    "lower training.learning_rate or check the data; no model was written"
                )
            logs = {key: float(values[-1]) for key, values in result.history.items()}
            for key, value in logs.items():
                history.setdefault(key, []).append(value)
            after, after_s = "", 0.0  # the checkpoint and tracking, in the process that writes them
            if on_epoch:
                checkpoint_s, tracking_s = on_epoch(epoch, logs)
                after = f" (then checkpoint {checkpoint_s:.3f} s, tracking {tracking_s:.3f} s)"
                after_s = checkpoint_s + tracking_s
            log.info("train %s: epoch %d/%d in %.2f s%s: %s", name, epoch + 1, epochs,
                     time.perf_counter() - started - after_s, after, " ".join(f"{k} {v:.5g}" for k, v in logs.items()))
    finally:
        validation.release()
    return history


def last_metrics(history: dict) -> dict:
    """Each metric's value after the last epoch, rounded for the log."""
    return {key: round(values[-1], 5) for key, values in history.items()}


def train(name: str, params: params_mod.Params, out: Path, checkpoints: Path) -> list[Path]:
    """Train experiment ``name``; returns the outputs written (none in a
    data-parallel process other than the chief: process 0 writes)."""
    import mlflow

    started = time.perf_counter()
    exp = params_mod.experiment(params, name)
    data = ExperimentData(name, exp)
    train_arrays, val_arrays = data.training()
    epochs = epochs_for(exp, params.limits)
    image_shape = tuple(train_arrays.x.shape[1:])
    where = f"experiments.{name}.training"
    if exp.training.distribution == "none" and one_op_at_a_time():
        log.info("train %s: TensorFlow on the CPU runs one op at a time (TF_NUM_INTEROP_THREADS=0 for its "
                 "own choice)", name)
    with distribution.setup(exp.training.distribution, exp.training.batch_size, where) as placement:
        configure_backend(exp.training.seed, exp.training.mixed_precision)
        inputs = sorted({str(data_path(exp.data.input)), str(data_path(exp.data.target))})
        config = exp.model_dump(mode="json")
        same_results = {**config, "training": {key: value for key, value in config["training"].items()
                                               if key != "checkpoint_interval_s"}}
        fingerprint = tracking.params_hash({"config": same_results, "epochs": epochs,
                                            "data": tracking.data_hashes(inputs), "samples": len(train_arrays)})
        checkpoint = Checkpoint(checkpoints, fingerprint)
        state = checkpoint.read()
        stale_run = None
        if not checkpoint.usable(state):
            if placement.chief:  # the others only read: process 0's checkpoints are the ones
                if state and not state.get("complete"):
                    log.info("checkpoint in %s is for other params or data; starting afresh", checkpoints)
                    stale_run = state.get("run_id")
                checkpoint.clear()
            state = None
        start = state["epoch"] if state else 0
        # several processes train one model: they must start from the same params, data and weights
        placement.agree("the params and data (every host needs the same params.yaml and data files: dvc pull)",
                        fingerprint)
        placement.agree(f"the epoch to resume from ({checkpoints}/ must be one shared folder, the same copy on "
                        "every host, or absent on every host)", start)
        if start > 0:
            model = checkpoint.model(state)
            log.info("train %s: resuming from checkpoint after epoch %d of %d", name, state["epoch"], epochs)
        else:
            steps_per_epoch = math.ceil(placement.usable_rows(len(train_arrays), exp.training.batch_size)
                                        / exp.training.batch_size)
            model = build(name, exp, image_shape, len(data.class_names), steps_per_epoch, epochs,
                          train_arrays.y)
            if state:
                log.info("train %s: continuing MLflow run %s, killed before its first checkpoint", name,
                         state["run_id"])
        log.info("train %s: %s on %s (%s), train %s val %s, %d epochs, batch %d, backend %s, %d replica(s)",
                 name, exp.model.kind, exp.data.input, data.source, train_arrays.x.shape, val_arrays.x.shape,
                 epochs, exp.training.batch_size, keras.backend.backend(), placement.replicas)
        if not placement.chief:  # trains its share of every batch; writes nothing
            history = fit(name, exp, train_arrays, val_arrays, model, start, epochs,
                          state["history"] if state else {}, None, placement)
            log.info("train %s: process %d of %d done: %s; process 0 writes the model, checkpoints and MLflow run",
                     name, placement.index, placement.processes, last_metrics(history))
            return []
        experiment_id = tracking.connect(exp.task)
        if stale_run:
            tracking.abandon(stale_run)
        run = tracking.start_run(state["run_id"] if state else None, name)
        run_id = run.info.run_id
        if state is None:
            state = checkpoint.start(run_id)  # from here on a killed training continues this run
        try:
            if not state.get("described"):
                with tracking.failures(f"train {name}"):
                    mlflow.log_params({**tracking.flatten(config), "epochs_run": epochs, "dataset_source": data.source,
                                       "train_samples": len(train_arrays), "val_samples": len(val_arrays),
                                       "replicas": placement.replicas, "processes": placement.processes})
                    mlflow.set_tags(tracking.run_tags(exp.task, name, f"train@{name}", inputs, config))
                state["described"] = True
                checkpoint.update(described=True)
            history = state["history"]
            metrics_log = tracking.MetricLog(run_id, logged=state.get("logged", state["epoch"]))

            last_checkpoint = time.perf_counter()

            def on_epoch(epoch: int, logs: dict) -> tuple[float, float]:
                # the checkpoint first: a store that does not answer never costs training
                nonlocal last_checkpoint
                started = time.perf_counter()
                if epoch + 1 == epochs or started - last_checkpoint >= exp.training.checkpoint_interval_s:
                    with placement.alone():
                        checkpoint.save(model, {"epoch": epoch + 1, "history": history, "run_id": run_id,
                                                "logged": metrics_log.logged, "described": True})
                    last_checkpoint = time.perf_counter()
                saved = time.perf_counter()
                if metrics_log.flush(history, epoch + 1):
                    checkpoint.update(logged=metrics_log.logged)
                return saved - started, time.perf_counter() - saved

            example = to_unit_float(train_arrays.x[:4])  # before fit, which releases the images
            fit_started = time.perf_counter()
            fit(name, exp, train_arrays, val_arrays, model, state["epoch"], epochs, history, on_epoch, placement)
            fit_s = time.perf_counter() - fit_started
            try:
                metrics_log.flush(history, epochs, required=True)
                checkpoint.update(logged=metrics_log.logged)
                with placement.alone():
                    log_model(model, example)
            except Exception as exc:  # noqa: BLE001 - the store failed; the trained model is safe
                raise tracking.TrackingError(
                    f"train {name}: the {epochs} epochs are trained and saved in {checkpoints}, but the MLflow "
                    f"store {tracking.tracking_label()} failed ({tracking.describe_failure(exc)}); run the stage "
                    "again when it answers: it logs the run without training again") from None
            with atomic.replacing(out, directory=True) as folder:
                checkpoint.export(folder / "model.keras")  # the model as trained: the last epoch is checkpointed
                (folder / "history.json").write_text(json.dumps(history, indent=2) + "\n")
                # this process's share when it resumed a killed run (resumed_at_epoch > 0)
                trained = {"epochs": epochs, "resumed_at_epoch": start,
                           "seconds": round(time.perf_counter() - started, 1), "fit_seconds": round(fit_s, 1),
                           **tracking.environment(), **tracking.git_state()}
                tracking.save_run_ref(folder / "run.json", run_id, experiment_id, trained)
            mlflow.end_run()
            checkpoint.update(complete=True)
        except BaseException:
            tracking.end_run_quietly("FAILED")
            raise
    log.info("train %s: %s", name, last_metrics(history))
    peak = distribution.device_peak_mib()
    if peak is not None:
        log.info("train %s: peak device memory %.0f MiB", name, peak)
    return [out]


def main(argv=None) -> int:
    def configure(parser):
        parser.add_argument("experiment", help="an experiment named under 'experiments' in params.yaml")
        parser.add_argument("--out", type=Path, help="output folder (default: models/<experiment>)")
        parser.add_argument("--checkpoints", type=Path, help="checkpoint folder (default: checkpoints/<experiment>)")

    def body(args):
        params = params_mod.load(args.params)
        out = args.out or Path("models") / args.experiment
        return train(args.experiment, params, out, args.checkpoints or Path("checkpoints") / args.experiment)

    return cli.run("train", __doc__, body, configure, argv)


if __name__ == "__main__":
    raise SystemExit(main())
