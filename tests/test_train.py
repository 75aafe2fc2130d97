"""The train and evaluate stages on tiny data, with a real MLflow SQLite store."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

import bench_module
from stages import evaluate as evaluate_mod
from stages import train as train_mod
from stages.images import DatasetFile, Split, save

SHAPE = (8, 8, 1)


def _dataset(n=(96, 32, 40), seed=0, shape=SHAPE, classes=3) -> DatasetFile:
    """Images whose brightness pattern depends on the label, so a classifier can learn."""
    rng = np.random.default_rng(seed)
    splits = {}
    for name, count in zip(("train", "val", "test"), n):
        labels = np.arange(count) % classes
        base = rng.integers(0, 60, (count, *shape))
        for c in range(classes):
            base[labels == c, :, c * shape[1] // classes:(c + 1) * shape[1] // classes] += 180
        splits[name] = Split(np.clip(base, 0, 255).astype(np.uint8), labels)
    return DatasetFile(splits, [f"c{i}" for i in range(classes)], {"dataset": "toy", "source": "toy_source"})


AE = {
    "task": "autoencoder", "seed_figure": "val_loss 0.1",
    "data": {"input": "prepared/toy", "target": "prepared/toy"},
    "model": {"kind": "conv_autoencoder", "filters": [4, 4], "poolings": 2},
    "training": {"loss": "bce", "optimizer": "adam", "epochs": 2, "batch_size": 16},
}
CLS = {
    "task": "classifier",
    "data": {"input": "prepared/toy", "target": "prepared/toy", "train_on": "train+val", "validate_on": "test"},
    "model": {"kind": "cnn", "conv": [{"filters": 4}], "dense": [16], "dropout": 0.3},
    "training": {"loss": "sparse_categorical_crossentropy", "optimizer": "rmsprop", "epochs": 2,
                 "batch_size": 16, "metrics": ["accuracy"]},
}

# beyond the seeds: batch norm, residual blocks, augmentation layers (their own
# RNG), dropout, label smoothing, a one-cycle SGD schedule, flip TTA
IMPROVED = {
    "task": "classifier",
    "data": {"input": "prepared/toy", "target": "prepared/toy"},
    "model": {"kind": "resnet", "stem": 4, "stages": [{"filters": 8, "blocks": 1}], "dropout": 0.2,
              "logit_scale": 0.5, "augment": {"flip": True, "translate": 0.2}},
    "training": {"loss": "sparse_categorical_crossentropy", "optimizer": "sgd", "learning_rate": 0.05,
                 "schedule": "one_cycle", "momentum": 0.9, "nesterov": True, "weight_decay": 0.0005,
                 "label_smoothing": 0.1, "epochs": 3, "batch_size": 16, "metrics": ["accuracy"]},
    "evaluation": {"flip_tta": True},
}


def _params(root: Path, experiments: dict, max_epochs=None) -> Path:
    params = {
        "limits": {"max_samples": None, "max_epochs": max_epochs},
        "datasets": {"toy": {"source": {"path": "unused.zip"}}},
        "experiments": experiments,
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """A project folder with a tiny prepared dataset and its own MLflow SQLite store."""
    root = tmp_path / "lab"
    root.mkdir()
    save(root / "data/prepared/toy.npz", _dataset())
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    return root


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def test_autoencoder_train_and_evaluate_log_one_mlflow_run(lab):
    _params(lab, {"ae": AE})
    assert train_mod.main(["ae"]) == 0
    assert evaluate_mod.main(["ae"]) == 0
    ref = json.loads((lab / "models/ae/run.json").read_text())
    run = _client().get_run(ref["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "ae"
    assert _client().get_experiment(run.info.experiment_id).name == "autoencoders"
    assert run.data.params["model.filters"] == "[4, 4]" and run.data.params["training.batch_size"] == "16"
    assert run.data.params["dataset_source"] == "toy_source"
    tags = run.data.tags
    assert tags["stage"] == "train@ae" and tags["evaluated_by"] == "evaluate@ae"
    assert len(tags["params_hash"]) == 16 and "git_dirty" in tags and "env.keras_backend" in tags
    assert "git_commit" not in tags  # MLflow records the commit itself (mlflow.source.git.commit)
    steps = [m.step for m in _client().get_metric_history(ref["run_id"], "val_loss")]
    assert steps == [1, 2]
    metrics = json.loads((lab / "metrics/ae.json").read_text())
    test = metrics["test"]
    assert metrics["dataset_source"] == "toy_source" and metrics["epochs"] == 2
    assert 0 < test["psnr"] < 100 and test["compression_ratio"] == 4.0
    assert "ssim" not in test  # 8x8 images: no pixel where SSIM's 11x11 window fits
    assert run.data.metrics["test_psnr"] == pytest.approx(test["psnr"])
    # the evaluate stage's BCE on the test split is what Keras reports as val_loss... here val is "val"
    assert test["latent_size"] == 2 * 2 * 4
    artifacts = {a.path for a in _client().list_artifacts(ref["run_id"], "evaluation")}
    assert {"evaluation/reconstructions.png", "evaluation/curves.png", "evaluation/ae.json"} <= artifacts
    # the model: an MLflow LoggedModel of the run, with signature and input example, the test metrics on it
    run = _client().get_run(ref["run_id"])
    model = _client().get_logged_model(ref["model_id"])
    assert model.source_run_id == ref["run_id"] and model.name == "ae"
    assert {m.key for m in model.metrics} >= {"test_psnr", "test_mse"}
    info = mlflow.models.get_model_info(f"models:/{ref['model_id']}")
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 8, 8, 1)
    assert info.saved_input_example_info["type"] == "ndarray"
    # registered as version 1 of model "ae", the first: @champion
    assert run.data.tags["promotion.alias"] == "champion" and run.data.tags["promotion.version"] == "1"
    assert str(_client().get_model_version_by_alias("ae", "champion").version) == "1"
    # the data it used, as dataset inputs: the file's md5 as digest, the split's shape as schema
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"prepared/toy:training", "prepared/toy:validation", "prepared/toy:test"}
    digest = hashlib.md5((lab / "data/prepared/toy.npz").read_bytes()).hexdigest()
    assert {i.dataset.digest for i in inputs.values()} == {digest}
    schema = json.loads(inputs["prepared/toy:test"].dataset.schema)["mlflow_colspec"]
    test_count = len(np.load(lab / "data/prepared/toy.npz")["test_images"])
    assert [(c["name"], c["tensor-spec"]["shape"]) for c in schema] == [("x", [test_count, 8, 8, 1]),
                                                                        ("y", [test_count, 8, 8, 1])]
    # reconstructions of the same validation images at every epoch (2 epochs: both), as MLflow images
    images = [a.path for a in _client().list_artifacts(ref["run_id"], "images")]
    steps = sorted(int(p.split("+step+")[1].split("+")[0]) for p in images if p.endswith(".png"))
    assert steps == [1, 2] and all("reconstructions" in p for p in images)
    curves = json.loads((lab / "plots/autoencoder/ae.json").read_text())
    assert [row["epoch"] for row in curves] == [1, 2] and "val_loss" in curves[0]


def test_classifier_metrics_match_the_model(lab):
    import keras

    _params(lab, {"cls": CLS})
    assert train_mod.main(["cls"]) == 0
    assert evaluate_mod.main(["cls"]) == 0
    test = json.loads((lab / "metrics/cls.json").read_text())["test"]
    data = _dataset().splits["test"]
    model = keras.models.load_model(lab / "models/cls/model.keras")
    from stages.images import to_unit_float
    predicted = np.asarray(model.predict(to_unit_float(data.images), verbose=0)).argmax(axis=1)
    assert test["accuracy"] == pytest.approx(float((predicted == data.labels).mean()), abs=1e-6)
    confusion = json.loads((lab / "reports/experiments/cls/confusion.json").read_text())
    assert np.asarray(confusion["confusion_matrix"]).sum() == len(data.labels)
    assert {p.name for p in (lab / "reports/experiments/cls").iterdir()} >= {"confusion_matrix.png", "curves.png"}
    assert (lab / "plots/images/cls.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # misclassified, a DVC plot
    run = _client().get_run(json.loads((lab / "models/cls/run.json").read_text())["run_id"])
    assert _client().get_experiment(run.info.experiment_id).name == "classifiers"
    assert run.data.metrics["test_accuracy"] == pytest.approx(test["accuracy"])


def test_improved_classifier_trains_with_its_recipe_and_flip_tta(lab):
    import keras

    from stages import recipes
    from stages.images import to_unit_float

    _params(lab, {"plus": IMPROVED})
    assert train_mod.main(["plus"]) == 0
    assert evaluate_mod.main(["plus"]) == 0
    model = keras.models.load_model(lab / "models/plus/model.keras")
    assert isinstance(model.loss, recipes.SmoothedSparseCrossentropy) and model.loss.smoothing == 0.1
    schedule = model.optimizer._learning_rate
    assert isinstance(schedule, recipes.OneCycle) and schedule.total_steps == 3 * 6  # 96 images, batch 16
    assert model.optimizer.nesterov and model.optimizer.weight_decay == pytest.approx(0.0005)
    test = json.loads((lab / "metrics/plus.json").read_text())["test"]
    data = _dataset().splits["test"]
    x = to_unit_float(data.images)
    plain = np.asarray(model.predict(x, verbose=0))
    averaged = (plain + np.asarray(model.predict(x[:, :, ::-1], verbose=0))) / 2
    assert test["accuracy_without_tta"] == pytest.approx(float((plain.argmax(1) == data.labels).mean()), abs=1e-6)
    assert test["accuracy"] == pytest.approx(float((averaged.argmax(1) == data.labels).mean()), abs=1e-6)
    run = _client().get_run(json.loads((lab / "models/plus/run.json").read_text())["run_id"])
    assert run.data.params["training.schedule"] == "one_cycle" and run.data.params["model.kind"] == "resnet"


def test_max_epochs_caps_training(lab):
    _params(lab, {"ae": {**AE, "training": {**AE["training"], "epochs": 5}}}, max_epochs=1)
    assert train_mod.main(["ae"]) == 0
    history = json.loads((lab / "models/ae/history.json").read_text())
    assert len(history["loss"]) == 1


def test_each_epoch_logs_its_time_and_its_checkpoint_and_tracking_times(lab, caplog):
    """The line benchmarks/bench_train.py reads the stage's epoch times from."""
    bench = bench_module.load("bench_train")
    _params(lab, {"ae": {**AE, "training": {**AE["training"], "epochs": 3}}})
    with caplog.at_level(logging.INFO, logger="stages"):
        assert train_mod.main(["ae"]) == 0
    lines = bench.EPOCH_LINE.findall(caplog.text)
    assert [line[0] for line in lines] == ["1", "2", "3"]
    after = bench.after_epoch(lines)
    assert len(after["checkpoint_s"]) == len(after["tracking_s"]) == len(after["images_s"]) == 3, lines
    assert all(seconds > 0 for seconds in after["images_s"]), lines  # 3 epochs: an image after each
    assert all(float(line[1]) > 0 for line in lines), lines
    # the default checkpoint_interval_s (120 s) is longer than these epochs: only the last one is checkpointed
    assert after["checkpoint_s"][:2] == [0.0, 0.0] and after["checkpoint_s"][2] > 0, lines
    assert json.loads((lab / "checkpoints/ae/state.json").read_text())["variables"] == "variables-a.npz"


def test_nan_stops_with_a_clear_error_and_no_model(lab, caplog):
    diverging = {**AE, "model": {**AE["model"], "output_activation": "linear"},
                 "training": {**AE["training"], "loss": "mse", "optimizer": "sgd", "learning_rate": 1e12}}
    _params(lab, {"boom": diverging})
    assert train_mod.main(["boom"]) == 1
    assert "experiments.boom: loss became NaN/inf at epoch 1, batch" in caplog.text
    assert not (lab / "models/boom/model.keras").exists() and not (lab / "models/boom/run.json").exists()
    runs = _client().search_runs([_client().get_experiment_by_name("autoencoders").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def _train_process(root: Path, name: str, tracking_uri: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "MLFLOW_TRACKING_URI": tracking_uri or f"sqlite:///{root / 'mlflow.db'}"}
    return subprocess.Popen([sys.executable, "-m", "stages.train", name], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_state(root: Path, name: str, process: subprocess.Popen, ready, timeout: float = 240) -> dict:
    """Poll ``checkpoints/<name>/state.json`` until ``ready(state)``; the training must still run."""
    path = root / "checkpoints" / name / "state.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = json.loads(path.read_text())
            if ready(state):
                return state
        except (OSError, ValueError, KeyError):
            pass
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.01)
    raise AssertionError(f"{path} never became ready")


def _toy_lab(root: Path, experiments: dict) -> Path:
    root.mkdir()
    save(root / "data/prepared/toy.npz", _dataset(n=(600, 100, 100), shape=(16, 16, 1)))
    _params(root, experiments)
    return root


@pytest.mark.parametrize("interval", [0, 3600])
def test_killed_training_resumes_and_matches_an_uninterrupted_run(tmp_path, interval):
    """A real SIGKILL after epoch 2 of 6; the re-run resumes and ends bit-identical,
    augmentation and dropout masks, batch norm statistics and schedule included.
    With ``checkpoint_interval_s`` 3600 no epoch before the last is checkpointed:
    the kill lands after two epochs were logged, and the re-run starts from
    the beginning, in the same MLflow run."""
    import keras

    experiment = {**IMPROVED, "training": {**IMPROVED["training"], "epochs": 6, "batch_size": 8,
                                           "checkpoint_interval_s": interval}}
    roots = {}
    for label in ("killed", "straight"):
        root = roots[label] = tmp_path / label
        root.mkdir()
        save(root / "data/prepared/toy.npz", _dataset(n=(600, 100, 100), shape=(16, 16, 1)))
        _params(root, {"cls": experiment})

    process = _train_process(roots["killed"], "cls")
    progress = "epoch" if interval == 0 else "logged"
    _wait_for_state(roots["killed"], "cls", process, lambda s: s.get(progress, 0) >= 2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_state = json.loads((roots["killed"] / "checkpoints/cls/state.json").read_text())
    assert 2 <= killed_state[progress] < 6, "the kill must land mid-run"
    if interval:
        assert killed_state["epoch"] == 0 and killed_state["variables"] is None
    assert not (roots["killed"] / "models/cls/model.keras").exists()

    resumed = _train_process(roots["killed"], "cls")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    if interval == 0:
        assert f"resuming from checkpoint after epoch {killed_state['epoch']} of 6" in err
    else:
        assert f"continuing MLflow run {killed_state['run_id']}, killed before its first checkpoint" in err
    straight = _train_process(roots["straight"], "cls")
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err

    models = {label: keras.models.load_model(root / "models/cls/model.keras") for label, root in roots.items()}
    for a, b in zip(models["killed"].get_weights(), models["straight"].get_weights()):
        np.testing.assert_array_equal(a, b)
    histories = {label: json.loads((root / "models/cls/history.json").read_text()) for label, root in roots.items()}
    assert histories["killed"] == histories["straight"]

    ref = json.loads((roots["killed"] / "models/cls/run.json").read_text())
    assert ref["run_id"] == killed_state["run_id"]  # the same MLflow run, continued
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{roots['killed'] / 'mlflow.db'}")
    assert client.get_run(ref["run_id"]).info.status == "FINISHED"
    logged = client.get_metric_history(ref["run_id"], "loss")
    assert sorted({m.step for m in logged}) == [1, 2, 3, 4, 5, 6]
    assert all(m.value == histories["straight"]["loss"][m.step - 1] for m in logged)  # before and after the kill


def test_changed_params_do_not_resume_a_stale_checkpoint(lab, caplog):
    _params(lab, {"ae": {**AE, "training": {**AE["training"], "epochs": 3}}}, max_epochs=1)
    assert train_mod.main(["ae"]) == 0
    state = json.loads((lab / "checkpoints/ae/state.json").read_text())
    assert state["complete"] is True
    shutil.rmtree(lab / "models")
    _params(lab, {"ae": {**AE, "training": {**AE["training"], "epochs": 3, "seed": 1}}}, max_epochs=2)
    assert train_mod.main(["ae"]) == 0
    assert "resuming" not in caplog.text
    assert len(json.loads((lab / "models/ae/history.json").read_text())["loss"]) == 2


def _killed_at_the_end(lab: Path, name: str) -> Path:
    """Train ``name``, then mark its checkpoint as that of a run killed after its last epoch."""
    assert train_mod.main([name]) == 0
    state_file = lab / f"checkpoints/{name}/state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "complete": False}))
    shutil.rmtree(lab / "models")
    return state_file


def test_a_changed_checkpoint_interval_still_resumes(lab, caplog):
    """checkpoint_interval_s changes no result, so it is not in the fingerprint."""
    caplog.set_level(logging.INFO)
    _params(lab, {"ae": {**AE, "training": {**AE["training"], "checkpoint_interval_s": 0}}})
    _killed_at_the_end(lab, "ae")
    _params(lab, {"ae": {**AE, "training": {**AE["training"], "checkpoint_interval_s": 600}}})
    assert train_mod.main(["ae"]) == 0
    assert "resuming from checkpoint after epoch 2 of 2" in caplog.text


def test_a_checkpoint_of_an_older_version_still_resumes(lab, caplog):
    """An older train stage also saved the model's structure (``"model": "model"``
    in state.json, a ``model/`` folder): the variables resume into the model
    built from the params; the extra key and folder are ignored."""
    caplog.set_level(logging.INFO)
    _params(lab, {"cls": CLS})
    state_file = _killed_at_the_end(lab, "cls")
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "model": "model"}))
    assert train_mod.main(["cls"]) == 0
    assert "resuming from checkpoint after epoch 2 of 2" in caplog.text


def test_a_checkpoint_that_no_longer_fits_the_model_is_a_clear_error(lab, caplog):
    """Same params, but a variable of another shape (the model's code changed
    after the kill): the stage fails naming the file, the variable and the
    way out, and assigns nothing."""
    _params(lab, {"cls": CLS})
    state_file = _killed_at_the_end(lab, "cls")
    saved = lab / "checkpoints/cls" / json.loads(state_file.read_text())["variables"]
    with np.load(saved) as arrays:
        changed = {key: arrays[key] for key in arrays.files}
    changed["v0"] = np.zeros((*changed["v0"].shape, 2), changed["v0"].dtype)
    np.savez(saved, **changed)
    assert train_mod.main(["cls"]) == 1
    error = caplog.records[-1].getMessage()
    assert error.startswith("train failed: checkpoints/cls/variables-a.npz: variable conv0/kernel is "
                            "(3, 3, 1, 4, 2) there and (3, 3, 1, 4) in the model"), error
    assert error.endswith("(remove checkpoints/cls to start afresh)"), error
    assert not (lab / "models/cls/model.keras").exists()


def test_shared_checkpoints_resume_in_another_copy_of_the_project_keyed_by_fingerprint(lab, tmp_path, caplog,
                                                                                     monkeypatch):
    """IMAGEPIPE_CHECKPOINTS: a training killed in one copy of the project (one
    machine) resumes in another from the shared folder of its fingerprint, in
    the same MLflow run; other params get a folder of their own."""
    caplog.set_level(logging.INFO)
    shared = tmp_path / "shared"
    monkeypatch.setenv("IMAGEPIPE_CHECKPOINTS", str(shared))
    _params(lab, {"ae": {**AE, "training": {**AE["training"], "checkpoint_interval_s": 0}}})
    assert train_mod.main(["ae"]) == 0
    [folder] = shared.iterdir()
    state = json.loads((folder / "state.json").read_text())
    assert folder.name == f"ae-{state['fingerprint']}" and not (lab / "checkpoints").exists()
    (folder / "state.json").write_text(json.dumps({**state, "complete": False}))  # killed at the end

    other = tmp_path / "other_copy"
    shutil.copytree(lab / "data", other / "data")
    shutil.copy(lab / "params.yaml", other)
    monkeypatch.chdir(other)
    assert train_mod.main(["ae"]) == 0
    assert "resuming from checkpoint after epoch 2 of 2" in caplog.text
    assert json.loads((other / "models/ae/run.json").read_text())["run_id"] == state["run_id"]

    _params(other, {"ae": {**AE, "training": {**AE["training"], "batch_size": 8, "epochs": 1}}})
    assert train_mod.main(["ae"]) == 0
    assert len(list(shared.iterdir())) == 2 and not (other / "checkpoints").exists()


def test_evaluate_with_a_run_from_another_store_fails_clearly(lab, caplog, monkeypatch, tmp_path):
    _params(lab, {"ae": {**AE, "training": {**AE["training"], "epochs": 1}}})
    assert train_mod.main(["ae"]) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    assert evaluate_mod.main(["ae"]) == 1
    run_id = json.loads((lab / "models/ae/run.json").read_text())["run_id"]
    assert f"MLflow run {run_id} for 'ae' cannot be continued" in caplog.text


def test_evaluate_before_train_says_what_to_run(lab, caplog):
    _params(lab, {"ae": AE})
    assert evaluate_mod.main(["ae"]) == 1
    assert "models/ae/run.json: not found; run the train stage first" in caplog.text


def test_training_killed_in_its_first_epoch_continues_the_same_mlflow_run(tmp_path):
    """The run id is in the checkpoint before the first epoch, so a kill then
    leaves no orphan RUNNING run and no duplicate."""
    from mlflow.tracking import MlflowClient

    root = _toy_lab(tmp_path / "lab", {"cls": {**CLS, "training": {**CLS["training"], "epochs": 2, "batch_size": 8}}})
    process = _train_process(root, "cls")
    state = _wait_for_state(root, "cls", process, lambda s: "run_id" in s)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert json.loads((root / "checkpoints/cls/state.json").read_text())["epoch"] == 0, "killed in epoch 1"
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert client.get_run(state["run_id"]).info.status == "RUNNING"

    again = _train_process(root, "cls")
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"continuing MLflow run {state['run_id']}, killed before its first checkpoint" in err
    runs = client.search_runs([client.get_experiment_by_name("classifiers").experiment_id])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(state["run_id"], "FINISHED")]
    assert sorted(m.step for m in client.get_metric_history(state["run_id"], "loss")) == [1, 2]


def test_a_killed_run_whose_params_changed_is_marked_killed(lab, caplog):
    """A checkpoint left by a killed training with other params is not resumed,
    and the run it names is marked KILLED instead of RUNNING forever."""
    caplog.set_level(logging.INFO)
    _params(lab, {"ae": {**AE, "training": {**AE["training"], "epochs": 1}}})
    client = _client()
    orphan = client.create_run(client.create_experiment("autoencoders")).info.run_id  # RUNNING
    (lab / "checkpoints/ae").mkdir(parents=True)
    (lab / "checkpoints/ae/state.json").write_text(json.dumps(
        {"epoch": 0, "history": {}, "run_id": orphan, "logged": 0, "fingerprint": "other params"}))
    assert train_mod.main(["ae"]) == 0
    assert "is for other params or data; starting afresh" in caplog.text
    assert client.get_run(orphan).info.status == "KILLED"
    new = json.loads((lab / "models/ae/run.json").read_text())["run_id"]
    assert new != orphan and client.get_run(new).info.status == "FINISHED"


def test_a_model_that_does_not_fit_the_images_is_refused_before_training(lab, caplog):
    """Poolings that do not divide an image folder's size are known only once it is prepared."""
    _params(lab, {"ae": {**AE, "model": {**AE["model"], "filters": [4, 4, 4, 4], "poolings": 4}}})
    assert train_mod.main(["ae"]) == 1
    assert ("experiments.ae.model does not fit prepared/toy's 8x8x1 images: 4 poolings need image sides "
            "divisible by 16, got 8x8") in caplog.text
    assert not (lab / "models").exists() and not (lab / "checkpoints").exists()


def test_a_linear_path_autoencoder_starts_where_the_pca_baseline_is(lab):
    """train fits its PCA on the same images as evaluate's baseline: barely trained, the two score alike."""
    experiment = {**AE, "model": {"kind": "residual_autoencoder", "filters": [4, 8], "blocks": [0, 1],
                                  "latent_channels": 2, "output_activation": "linear", "linear_path": True},
                  "training": {"loss": "mse", "learning_rate": 1e-7, "epochs": 1, "batch_size": 16}}
    _params(lab, {"lin": experiment})
    assert train_mod.main(["lin"]) == 0
    assert evaluate_mod.main(["lin"]) == 0
    test = json.loads((lab / "metrics/lin.json").read_text())["test"]
    assert test["latent_size"] == 32
    assert test["psnr"] == pytest.approx(test["pca_baseline_psnr"], abs=0.01)


def test_autoencoder_metrics_match_the_model(lab):
    """Scored from the uint8 test images and one float copy of the predictions,
    clipped in place: the raw output's MSE and the clipped images' PSNR are
    what the model's own predictions give."""
    import keras

    from stages.images import to_unit_float

    experiment = {**AE, "model": {"kind": "residual_autoencoder", "filters": [4, 8], "blocks": [0, 1],
                                  "latent_channels": 2, "output_activation": "linear"},
                  "training": {"loss": "mse", "learning_rate": 0.01, "epochs": 1, "batch_size": 16}}
    _params(lab, {"lin": experiment})
    assert train_mod.main(["lin"]) == 0
    assert evaluate_mod.main(["lin"]) == 0
    test = json.loads((lab / "metrics/lin.json").read_text())["test"]
    target = to_unit_float(_dataset().splits["test"].images).astype(np.float64)
    model = keras.models.load_model(lab / "models/lin/model.keras")
    output = np.asarray(model.predict(target.astype(np.float32), verbose=0), np.float64)
    assert output.min() < 0 or output.max() > 1  # a linear output: clipping is tested
    np.testing.assert_allclose(evaluate_mod.predict(model, _dataset().splits["test"].images, batch_size=16),
                               output, atol=1e-6)  # 40 images in batches of 16: the last one short
    image_mse = np.mean(np.square(target - np.clip(output, 0, 1)).reshape(len(target), -1), axis=1)
    assert test["mse"] == pytest.approx(np.mean(np.square(target - output)), abs=2e-6)
    assert test["psnr"] == pytest.approx(np.mean(10 * np.log10(1 / image_mse)), abs=2e-5)
    assert test["psnr_pooled"] == pytest.approx(10 * np.log10(1 / image_mse.mean()), abs=2e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_gradient_accumulation_steps_once_with_the_mean_gradient_of_its_batches(optimizer):
    """Two batches of 4 with accumulation 2 are one optimizer step on their
    mean gradient: the weights equal one step on the batch of 8; after the
    first batch alone they have not moved."""
    import keras

    from stages.experiment_params import Training
    from stages.training import optimizer_for

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8, 2)).astype(np.float32)

    def fitted(batch_size, accumulate, n=8):
        keras.utils.set_random_seed(1)
        inputs = keras.Input((3,))
        model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(4, activation="tanh")(inputs)))
        t = Training(loss="mse", optimizer=optimizer, learning_rate=0.1, epochs=1, batch_size=batch_size,
                     gradient_accumulation_steps=accumulate)
        model.compile(optimizer=optimizer_for(t, total_steps=2), loss="mse")
        start = [w.copy() for w in model.get_weights()]
        model.fit(x[:n], y[:n], batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
        return start, model.get_weights()

    start, whole = fitted(8, None)
    _, accumulated = fitted(4, 2)
    for a, b, s in zip(accumulated, whole, start):
        assert not np.allclose(b, s)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    start, half = fitted(4, 2, n=4)
    for a, s in zip(half, start):
        np.testing.assert_array_equal(a, s)


def test_colour_accuracy_groups_the_test_digits_by_their_channel():
    from stages.corruptions import colorize_channel

    grey = np.random.default_rng(0).integers(1, 256, (90, 6, 6, 1), dtype=np.uint8)
    images, channels = colorize_channel(grey, np.random.default_rng(1), allowed=(0, 2))
    correct = channels == 0  # every red digit right, every blue one wrong
    assert evaluate_mod.colour_accuracy(images, correct) == {"colour_accuracy.red": 1.0, "colour_accuracy.blue": 0.0}


def test_colorization_scores_the_grey_input_as_its_baseline(lab):
    from stages import corruptions, metrics
    from stages.images import to_unit_float

    colour = _dataset(shape=(16, 16, 3))  # at least SSIM's 11x11 window
    save(lab / "data/prepared/toy.npz", colour)
    grey = DatasetFile({k: Split(corruptions.grayscale(v.images), v.labels) for k, v in colour.splits.items()},
                       colour.class_names, colour.meta)
    save(lab / "data/prepared/grey.npz", grey)
    experiment = {"task": "autoencoder", "data": {"input": "prepared/grey", "target": "prepared/toy"},
                  "model": {"kind": "residual_autoencoder", "filters": [4, 8], "blocks": [1, 1],
                            "latent_channels": 4},
                  "training": {"loss": "mse", "optimizer": "adamw", "learning_rate": 0.003, "schedule": "cosine",
                               "epochs": 2, "batch_size": 16}}
    params = yaml.safe_load(_params(lab, {"colorize": experiment}).read_text())
    params["datasets"]["grey"] = params["datasets"]["toy"]
    (lab / "params.yaml").write_text(yaml.safe_dump(params))
    assert train_mod.main(["colorize"]) == 0
    assert evaluate_mod.main(["colorize"]) == 0
    test = json.loads((lab / "metrics/colorize.json").read_text())["test"]
    target, source = (to_unit_float(d.splits["test"].images) for d in (colour, grey))
    assert test["psnr_input"] == pytest.approx(metrics.psnr(target, source), abs=1e-4)
    assert test["ssim_input"] == pytest.approx(metrics.ssim(target, source), abs=1e-5)
    assert test["latent_size"] == 8 * 8 * 4 and test["compression_ratio"] == pytest.approx(3.0)


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_data_on_device_trains_exactly_as_from_host_arrays(tmp_path, backend):
    """The same classifier trained from host arrays and from arrays on the
    device: identical losses and accuracies at every epoch, on each backend."""
    import importlib.util

    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    root = tmp_path / "lab"
    save(root / "data/prepared/toy.npz", _dataset())
    device = {**CLS, "training": {**CLS["training"], "data_on_device": True}}
    _params(root, {"host": CLS, "device": device})
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for name in ("host", "device"):
        result = subprocess.run([sys.executable, "-m", "stages.train", name], cwd=root, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        copied = f"train {name}: 128 train and 40 validation images copied to the device ({backend})"
        assert (copied in result.stderr) == (name == "device")
    host = json.loads((root / "models/host/history.json").read_text())
    device = json.loads((root / "models/device/history.json").read_text())
    assert set(host) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert device == host


def test_the_model_file_is_the_last_checkpoint_zipped_as_keras_zips_it(lab, tmp_path):
    import zipfile

    import keras

    from stages import params as params_mod
    from stages.checkpoint import Checkpoint, State
    from stages.training import compiled_model

    _params(lab, {"cls": CLS})
    assert train_mod.main(["cls"]) == 0
    state = State(**json.loads((lab / "checkpoints/cls/state.json").read_text()))
    assert state.epoch == 2 and state.variables == "variables-a.npz" and state.complete
    assert sorted(p.name for p in (lab / "checkpoints/cls").iterdir()) == ["state.json", "variables-a.npz"]
    model = keras.models.load_model(lab / "models/cls/model.keras")
    exp = params_mod.experiment(params_mod.load(lab / "params.yaml"), "cls")
    fresh = compiled_model("cls", exp, model.input_shape[1:], model.output_shape[-1], 8, 2)  # its own new weights
    checkpointed = Checkpoint(lab / "checkpoints/cls", state.fingerprint).restore(fresh, state)
    # the seed generators' states (in the checkpoint, for a resumed run) are not part of a .keras file
    for ours, theirs in zip(model.weights + model.optimizer.variables,
                            checkpointed.weights + checkpointed.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert int(model.optimizer.iterations) == 2 * 8  # (96 + 32) / 16 batches, two epochs
    model.save(tmp_path / "by_keras.keras")
    members = {info.filename: info.compress_type for info in zipfile.ZipFile(tmp_path / "by_keras.keras").infolist()}
    assert {info.filename: info.compress_type
            for info in zipfile.ZipFile(lab / "models/cls/model.keras").infolist()} == members


@pytest.mark.parametrize("feed", ["backend's", "PyDataset"])
def test_fit_lets_the_images_go_before_the_last_epochs_checkpoint(feed, monkeypatch):
    """fit lets the images go before the last checkpoint and the saves after
    training. Through a PyDataset (every backend but TensorFlow), which Keras
    on TensorFlow would keep (tf.data's generator registry): at the last
    epoch's end, and the batches (with their order) keep none behind. On
    TensorFlow, whose tf.data pipeline holds its own copy: before the first epoch."""
    import gc
    import weakref

    import keras

    from stages import feeder
    from stages.callbacks import NanGuard
    from stages.experiment_data import Arrays
    from stages.experiment_params import Experiment
    from stages.feeder import ScaledBatches
    from stages.training import compiled_model

    if feed == "PyDataset":
        monkeypatch.setattr(feeder, "for_fit", lambda arrays, size, targets, seed=None, epoch=0, epochs=None,
                            placement=None: ScaledBatches(arrays, size, targets, seed, epoch))
    data = _dataset()
    exp = Experiment.model_validate(CLS)
    train = Arrays(data.splits["train"].images.copy(), data.splits["train"].labels)
    val = Arrays(data.splits["val"].images.copy(), data.splits["val"].labels)
    alive = [weakref.ref(train.x), weakref.ref(val.x)]
    del data
    model = compiled_model("cls", exp, SHAPE, 3, 6, 3)
    seen = []
    gc.collect()
    earlier = {id(obj) for obj in gc.get_objects() if isinstance(obj, ScaledBatches)}  # other tests' in this process

    class Watch(keras.callbacks.Callback):  # where the checkpoint callback runs
        def on_epoch_end(self, epoch, logs=None):
            gc.collect()
            seen.append([ref() is not None for ref in alive])

    train_mod.fit("cls", exp, train, val, model, 0, 3, [Watch()], NanGuard())
    pydataset = feed == "PyDataset" or keras.backend.backend() != "tensorflow"
    assert seen == ([[True, True], [True, True], [False, False]] if pydataset else [[False, False]] * 3)
    gc.collect()
    kept = [obj for obj in gc.get_objects() if isinstance(obj, ScaledBatches) and id(obj) not in earlier]
    assert all(obj.arrays is None and not obj._orders for obj in kept)
    if feed == "PyDataset":
        assert keras.backend.backend() != "tensorflow" or len(kept) >= 2  # what the release is for
