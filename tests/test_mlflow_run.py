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
