"""stages/mlflow_store.py: which MLflow store, its credentials and its failures."""


import os
from pathlib import Path


from stages import mlflow_run, mlflow_store


def test_default_store_is_the_project_database(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert mlflow_store.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_queued_and_temp_experiments_log_into_the_project_store(tmp_path, monkeypatch):
    # dvc exp run --queue / --temp runs the stages in a copy under .dvc/tmp/exps
    copy = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    copy.mkdir(parents=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(copy)
    assert mlflow_store.project_root() == (tmp_path / "proj").resolve()
    assert mlflow_store.tracking_uri() == f"sqlite:///{(tmp_path / 'proj').resolve() / 'mlflow.db'}"


def test_environment_variable_wins_and_its_credentials_are_never_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cret@mlflow.example.org")
    assert mlflow_store.tracking_uri() == "https://alice:s3cret@mlflow.example.org"
    mlflow_run.save_run_ref(tmp_path / "run.json", "abc", "1")
    text = (tmp_path / "run.json").read_text()
    assert "s3cret" not in text and "mlflow.example.org" in text


def test_use_store_hands_credentials_to_mlflow_as_basic_auth(tmp_path, monkeypatch):
    import mlflow

    for key in mlflow_store.HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")  # exported earlier: the URI's user wins
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "bobs-password")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://ann:secret@127.0.0.1:9")
    try:
        assert mlflow_store.use_store() == "http://127.0.0.1:9"
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
    assert mlflow_store.describe_failure(refused) == "connection refused (3 tries)"
    other = Exception("Bad request to https://bob:hunter2@host/api\nsecond line")
    assert mlflow_store.describe_failure(other) == "Bad request to https://***@host/api"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    locked = Exception("(sqlite3.OperationalError) database is locked")
    assert mlflow_store.describe_failure(locked) == "database is locked"


def test_stages_starting_together_on_a_new_sqlite_store_all_connect(tmp_path):
    """Six processes (the GPU machine's side-by-side seed runs, or queued
    experiments) connecting at the same moment to a store that does not exist
    yet: one creates its tables and experiments while the others wait, and
    every one gets the same experiment ids."""

    db = tmp_path / "mlflow.db"
    results = _together(f"sqlite:///{db}", "print(mlflow_store.connect('autoencoders'), "
                        "mlflow_store.connect('classifiers'))", delay_s=6)
    assert len({out.strip() for out, _, _ in results}) == 1  # the same two experiments for all


def test_experiments_open_on_the_model_training_side_and_a_chosen_kind_stays(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'kind.db'}")
    first = mlflow_store.connect("autoencoders")
    client = MlflowClient()
    assert client.get_experiment(first).tags[mlflow_store.EXPERIMENT_KIND] == "custom_model_development"
    client.set_experiment_tag(first, mlflow_store.EXPERIMENT_KIND, "genai_development")  # a user's choice
    assert mlflow_store.connect("autoencoders") == first
    assert client.get_experiment(first).tags[mlflow_store.EXPERIMENT_KIND] == "genai_development"


def test_mlflow_telemetry_is_off_in_the_stages_unless_asked_for(tmp_path):
    """Its thread races the stages' requests where it cannot reach its server
    (see stages/mlflow_store.py). Checked in a process that MLflow does not take
    for a test or CI run (where it switches telemetry off by itself)."""
    import subprocess
    import sys

    probe = ("import stages.mlflow_store, mlflow; from mlflow.telemetry import get_telemetry_client; "
             "print(get_telemetry_client() is None)")
    # what mlflow.telemetry.utils takes for a test or CI run, and the switches themselves
    quiet = {"PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CI", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"}
    env = {k: v for k, v in os.environ.items() if k not in quiet}

    def telemetry_off(**extra) -> bool:
        out = subprocess.run([sys.executable, "-c", probe], env={**env, **extra}, cwd=Path(__file__).parents[1],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1] == "True"

    assert telemetry_off()
    assert not telemetry_off(MLFLOW_DISABLE_TELEMETRY="false")  # the user's choice wins


def test_stages_starting_together_on_a_new_tracking_server_all_log_to_the_experiment(tmp_path):
    """Six processes connecting at the same moment to a server that has no
    experiments yet (a sweep's first trainings, ``dvc queue start -j N``):
    those that lose the race to create the experiment (MLflow answers
    RESOURCE_ALREADY_EXISTS, and its set_experiment then returns without
    making it the active one) or to tag it still start their runs in it."""

    from mlflow_server import MlflowServer

    server = MlflowServer(tmp_path / "server").start()
    try:
        results = _together(server.url, "eid = mlflow_store.connect('autoencoders'); "
                            "run = mlflow.start_run(); mlflow.end_run(); print(eid, run.info.experiment_id)",
                            delay_s=8)
        experiment = server.experiment_id("autoencoders")
        ids = {out.strip().splitlines()[-1] for out, _, _ in results}  # after MLflow's "View run" lines
        assert ids == {f"{experiment} {experiment}"}, ids
        assert len(server.runs("autoencoders")) == 6
    finally:
        server.stop()


def _together(uri: str, code: str, delay_s: float, count: int = 6) -> list[tuple[str, str, int]]:
    """``code`` run by ``count`` processes at the same moment (``delay_s`` from
    now, after every one has imported MLflow) against the store ``uri``; each
    one's (stdout, stderr, exit code), checked to have succeeded."""
    import subprocess
    import sys
    import time

    start = time.time() + delay_s
    script = f"import time, mlflow; from stages import mlflow_store; time.sleep(max(0, {start} - time.time())); {code}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    processes = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(count)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in processes]
    failed = [err[-800:] for _, err, status in results if status != 0]
    assert not failed, failed
    return results
