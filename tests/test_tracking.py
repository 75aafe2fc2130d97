"""Where MLflow runs go, and what ties them to git and DVC."""

import json
import os
from pathlib import Path

import pytest
import yaml

from stages import tracking


def test_default_store_is_the_project_database(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_queued_and_temp_experiments_log_into_the_project_store(tmp_path, monkeypatch):
    # dvc exp run --queue / --temp runs the stages in a copy under .dvc/tmp/exps
    copy = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    copy.mkdir(parents=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(copy)
    assert tracking.project_root() == (tmp_path / "proj").resolve()
    assert tracking.tracking_uri() == f"sqlite:///{(tmp_path / 'proj').resolve() / 'mlflow.db'}"


def test_environment_variable_wins_and_its_credentials_are_never_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cret@mlflow.example.org")
    assert tracking.tracking_uri() == "https://alice:s3cret@mlflow.example.org"
    tracking.save_run_ref(tmp_path / "run.json", "abc", "1")
    text = (tmp_path / "run.json").read_text()
    assert "s3cret" not in text and "mlflow.example.org" in text


def test_run_ref_records_the_default_store_without_a_machine_path(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    tracking.save_run_ref(Path("models/x/run.json"), "abc", "1")
    ref = tracking.load_run_ref(Path("models/x/run.json"))
    assert ref == {"run_id": "abc", "experiment_id": "1", "tracking_uri": "sqlite:///mlflow.db"}
    assert not list(Path("models/x").glob(".*partial"))


def test_run_ref_errors_name_the_file(tmp_path):
    with pytest.raises(tracking.TrackingError, match=r"run\.json: not found; run the train stage first"):
        tracking.load_run_ref(tmp_path / "run.json")
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(tracking.TrackingError, match=r"run\.json: not valid JSON"):
        tracking.load_run_ref(tmp_path / "run.json")


def test_data_hashes_come_from_the_stage_that_wrote_the_file(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "prepare@mnist": {"cmd": "x", "outs": [{"path": "data/prepared/mnist.npz", "md5": "aa11"}]},
        "corrupt@noisy": {"cmd": "y", "deps": [{"path": "data/prepared/mnist.npz", "md5": "stale"}],
                          "outs": [{"path": "data/corrupted/noisy.npz", "md5": "bb22"}]},
    }}))
    found = tracking.data_hashes(["data/prepared/mnist.npz", "data/corrupted/noisy.npz", "data/none.npz"], lock)
    assert found == {"data/prepared/mnist.npz": "aa11", "data/corrupted/noisy.npz": "bb22"}
    assert tracking.data_hashes(["data/prepared/mnist.npz"], tmp_path / "missing.lock") == {}


def test_flatten_and_params_hash():
    tree = {"model": {"filters": [16, 8], "kind": "cae"}, "epochs": 10}
    assert tracking.flatten(tree) == {"model.filters": json.dumps([16, 8]), "model.kind": "cae", "epochs": "10"}
    assert tracking.params_hash(tree) == tracking.params_hash(json.loads(json.dumps(tree)))
    assert tracking.params_hash(tree) != tracking.params_hash({**tree, "epochs": 11})


def test_credentials_are_split_from_an_http_uri_only():
    assert tracking.split_credentials("https://ann:p%40ss@mlflow.example:5000/base") == (
        "https://mlflow.example:5000/base", "ann", "p@ss")
    assert tracking.split_credentials("http://127.0.0.1:5000") == ("http://127.0.0.1:5000", None, None)
    assert tracking.split_credentials("sqlite:///a/b.db") == ("sqlite:///a/b.db", None, None)


def test_use_store_hands_credentials_to_mlflow_as_basic_auth(tmp_path, monkeypatch):
    import mlflow

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", *tracking.HTTP_DEFAULTS):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://ann:secret@127.0.0.1:9")
    try:
        assert tracking.use_store() == "http://127.0.0.1:9"
        assert mlflow.get_tracking_uri() == "http://127.0.0.1:9"
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == "ann" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "secret"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "6"  # bounded unless the user says otherwise
    finally:
        mlflow.set_tracking_uri(None)


def test_failures_are_described_in_one_line_without_credentials(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    refused = Exception("API request to http://127.0.0.1:9/api failed: Max retries exceeded "
                        "(Caused by NewConnectionError(': Failed to establish a new connection: "
                        "[Errno 111] Connection refused'))")
    assert tracking.describe_failure(refused) == "connection refused (3 tries)"
    other = Exception("Bad request to https://bob:hunter2@host/api\nsecond line")
    assert tracking.describe_failure(other) == "Bad request to https://***@host/api"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    assert tracking.describe_failure(Exception("(sqlite3.OperationalError) database is locked")) == "database is locked"


def test_stages_starting_together_on_a_new_sqlite_store_all_connect(tmp_path):
    """Six processes (the GPU machine's side-by-side seed runs, or queued
    experiments) connecting at the same moment to a store that does not exist
    yet: one creates its tables and experiments while the others wait, and
    every one gets the same experiment ids."""
    import subprocess
    import sys
    import time

    db = tmp_path / "mlflow.db"
    start = time.time() + 6  # after every process has imported MLflow
    script = ("import sys, time; from stages import tracking; "
              f"time.sleep(max(0, {start} - time.time())); "
              "print(tracking.connect('autoencoder'), tracking.connect('classifier'))")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    processes = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(6)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in processes]
    failed = [err[-800:] for _, err, code in results if code != 0]
    assert not failed, failed
    assert len({out.strip() for out, _, _ in results}) == 1  # the same two experiments for all


def test_a_copied_tree_names_its_source_commit_over_any_git_it_holds(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.delenv(tracking.SOURCE_COMMIT, raising=False)
    assert tracking.git_state(tmp_path) == {"git_commit": "unknown", "git_dirty": "unknown"}  # no .git at all
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "old"], check=True)
    old = tracking.git_state(tmp_path)["git_commit"]
    assert len(old) == 40
    monkeypatch.setenv(tracking.SOURCE_COMMIT, "0123abcd")
    assert tracking.git_state(tmp_path) == {"git_commit": "0123abcd", "git_dirty": "unknown"}


def test_run_ref_keeps_how_the_model_was_trained(tmp_path):
    trained = {"epochs": 3, "seconds": 12.5, "accelerator": "none", "keras_backend": "tensorflow"}
    tracking.save_run_ref(tmp_path / "run.json", "r1", "7", trained)
    assert tracking.load_run_ref(tmp_path / "run.json")["trained"] == trained
    tracking.save_run_ref(tmp_path / "plain.json", "r1", "7")
    assert "trained" not in tracking.load_run_ref(tmp_path / "plain.json")


def test_environment_names_the_machine_backend_and_versions():
    env = tracking.environment()
    assert env["cpu"] and env["cpu"] != "unknown"
    assert env["accelerator"]  # "none" without one
    assert env["keras_backend"] in env and env["numpy"]
