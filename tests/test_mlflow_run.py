"""stages/mlflow_run.py: a run's references and params."""


import json
from pathlib import Path

import pytest

from stages import mlflow_run, mlflow_store, provenance


def test_run_ref_records_the_default_store_without_a_machine_path(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow_run.save_run_ref(Path("models/x/run.json"), "abc", "1")
    ref = mlflow_run.load_run_ref(Path("models/x/run.json"))
    assert ref == {"run_id": "abc", "experiment_id": "1", "tracking_uri": "sqlite:///mlflow.db"}
    assert not list(Path("models/x").glob(".*partial"))


def test_run_ref_errors_name_the_file(tmp_path):
    with pytest.raises(mlflow_store.TrackingError, match=r"run\.json: not found; run the train stage first"):
        mlflow_run.load_run_ref(tmp_path / "run.json")
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(mlflow_store.TrackingError, match=r"run\.json: not valid JSON"):
        mlflow_run.load_run_ref(tmp_path / "run.json")


def test_flatten_and_params_hash():
    tree = {"model": {"filters": [16, 8], "kind": "cae"}, "epochs": 10}
    assert mlflow_run.flatten(tree) == {"model.filters": json.dumps([16, 8]), "model.kind": "cae", "epochs": "10"}
    assert provenance.params_hash(tree) == provenance.params_hash(json.loads(json.dumps(tree)))
    assert provenance.params_hash(tree) != provenance.params_hash({**tree, "epochs": 11})


def test_run_ref_keeps_how_the_model_was_trained(tmp_path):
    trained = {"epochs": 3, "seconds": 12.5, "accelerator": "none", "keras_backend": "tensorflow"}
    mlflow_run.save_run_ref(tmp_path / "run.json", "r1", "7", trained)
    assert mlflow_run.load_run_ref(tmp_path / "run.json")["trained"] == trained
    mlflow_run.save_run_ref(tmp_path / "plain.json", "r1", "7")
    assert "trained" not in mlflow_run.load_run_ref(tmp_path / "plain.json")


def test_a_continued_run_does_not_send_again_the_epochs_the_store_has(tmp_path, monkeypatch):
    """A training killed after sending epoch 3 but before its state said so
    (the checkpoint says 2): continuing, it sends epoch 4 only, and every
    epoch is in the store once. Without asking the store, epoch 3 went twice
    (seen on a Ray node killed mid-training)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    history = {"loss": [0.4, 0.3, 0.2, 0.1], "val_loss": [0.5, 0.4, 0.3, 0.2]}
    client.log_batch(run_id, metrics=[Metric(k, v[s - 1], 0, s) for s in (1, 2, 3) for k, v in history.items()])

    assert mlflow_run.MetricLog(run_id, logged=2).logged == 2  # what the checkpoint alone says
    metric_log = mlflow_run.MetricLog.continuing(run_id, logged=2)
    assert metric_log.logged == 3
    assert metric_log.flush(history, 3) and metric_log.flush(history, 4)
    for key in history:
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3, 4], key
    fresh = client.create_run(client.get_experiment_by_name("e").experiment_id).info.run_id
    assert mlflow_run.MetricLog.continuing(fresh, logged=0).logged == 0


def test_epochs_sent_again_after_a_lost_answer_are_stored_once(tmp_path, monkeypatch):
    """A store that took a batch but whose answer never came back (PostgreSQL
    stopped mid-request behind the team server) is sent the same epochs again
    by the next flush: they keep their first timestamps, so MLflow stores each
    epoch once. With a new timestamp per try, epoch 2 was in the run twice."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    history = {"loss": [0.4, 0.3, 0.2], "val_loss": [0.5, 0.4, 0.3]}
    metric_log = mlflow_run.MetricLog(run_id, pause_s=0)
    assert metric_log.flush(history, 1)

    log_batch = MlflowClient.log_batch

    def stored_then_lost(self, *args, **kwargs):  # the real store takes the batch; its answer is lost
        log_batch(self, *args, **kwargs)
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(MlflowClient, "log_batch", stored_then_lost)
    assert not metric_log.flush(history, 2)
    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]  # it was stored

    monkeypatch.setattr(mlflow_run.time, "time", lambda: 4_000_000_000.0)  # the next try, a later clock
    assert metric_log.flush(history, 3)
    for key in history:
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3], key
    stamps = {m.step: m.timestamp for m in client.get_metric_history(run_id, "loss")}
    assert stamps[3] == 4_000_000_000_000 and stamps[2] < stamps[3]


def test_a_model_saved_already_is_logged_as_that_file_and_loads_back(tmp_path, monkeypatch):
    """``log_keras_model(..., saved=file)``: the LoggedModel's ``.keras`` file is
    a copy of ``file`` (Keras does not save the model again) and MLflow loads
    it back as a model computing what the original does."""
    import keras
    import mlflow
    import numpy as np

    from stages.checkpoint import Checkpoint

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow_store.use_store()
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    saved = tmp_path / "model.keras"
    Checkpoint(tmp_path / "ck", "f").export(model, saved)
    example = np.arange(8, dtype=np.float32).reshape(2, 4)
    mlflow.set_experiment("logged")
    with mlflow.start_run():
        model_id = mlflow_run.log_keras_model(model, example, "dense", saved)
    logged = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path / "logged")))
    assert (logged / "data" / "model.keras").read_bytes() == saved.read_bytes()
    loaded = mlflow.keras.load_model(f"models:/{model_id}")
    np.testing.assert_array_equal(loaded.predict(example, verbose=0), model.predict(example, verbose=0))
