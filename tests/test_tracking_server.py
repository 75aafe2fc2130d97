"""Training against a real ``mlflow server`` on 127.0.0.1 over HTTP: a server
that refuses or hangs, one killed during training and started again, and
the DVC pipeline with two queued experiments side by side, all read back
through the server's REST API."""

from __future__ import annotations

import json
import signal
import socket
import time

import pytest

import builders
from dvc_helpers import dvc_env, git_commit, make_project, pets_params, ran, run_dvc, wait_for_queue
from cluster.postgres import free_port
from mlflow_server import MlflowServer, metrics, params, tags
from stages import mlflow_store
from stages import train as train_mod
from test_pipeline import PETS_CNN
import test_train
from test_train import AE, CLS, _params, _toy_lab, _train_process, _wait_for_state

pytestmark = pytest.mark.heavy  # real pipelines, servers or clusters: scheduled first (conftest.py)

lab = test_train.lab  # the fixture: a project with a tiny prepared dataset


@pytest.fixture
def http_defaults(monkeypatch):
    """The stage's own HTTP limits, restored after the test (the stage sets them in os.environ)."""
    for key, value in mlflow_store.HTTP_DEFAULTS.items():
        monkeypatch.setenv(key, value)
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize("failure", ["refused", "hangs"])
def test_an_unreachable_server_fails_the_stage_clearly_within_30_s(lab, monkeypatch, caplog, http_defaults,
                                                                    failure):
    """Nothing listening (refused), or a server that accepts and never answers:
    a one-line error naming the store, in under 30 s, and nothing written."""
    listener = None
    if failure == "hangs":
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel completes connections; nobody ever reads or answers
        port = listener.getsockname()[1]
    else:
        port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    _params(lab, {"ae": AE})
    try:
        started = time.monotonic()
        code = train_mod.main(["ae"])
        elapsed = time.monotonic() - started
    finally:
        if listener:
            listener.close()
    assert code == 1 and elapsed < 30, elapsed
    reason = "connection refused (3 tries)" if failure == "refused" else "no answer within 6 s (3 tries)"
    assert f"MLflow store http://127.0.0.1:{port} unusable: {reason}; check that it is running" in caplog.text
    assert not (lab / "models").exists() and not (lab / "checkpoints").exists()


def _only_run(server: MlflowServer, experiment: str) -> dict:
    runs = server.runs(experiment)
    assert len(runs) == 1, [r["info"]["run_id"] for r in runs]
    return runs[0]


def test_server_killed_during_training_and_started_again_loses_nothing(tmp_path):
    """kill -9 of the server after epoch 2; training goes on with a warning; the
    server comes back on the same port and database (the training is paused
    with SIGSTOP while it starts, standing in for a long epoch); the run ends
    FINISHED with every epoch's metrics once and the model artifact."""
    server = MlflowServer(tmp_path / "server").start()
    root = _toy_lab(tmp_path / "lab", {"cls": {**CLS, "training": {**CLS["training"], "epochs": 8, "batch_size": 8,
                                                                   "checkpoint_interval_s": 0}}})
    process = _train_process(root, "cls", server.url)
    try:
        _wait_for_state(root, "cls", process, lambda s: s["epoch"] >= 2)
        server.stop(signal.SIGKILL)
        _wait_for_state(root, "cls", process, lambda s: s["epoch"] >= 4)  # trains on without the server
        process.send_signal(signal.SIGSTOP)
        server.start()
        process.send_signal(signal.SIGCONT)
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        assert "did not answer (" in err and "are kept and sent later" in err
        run = _only_run(server, "classifiers")
        assert run["info"]["status"] == "FINISHED"
        assert server.metric_steps(run["info"]["run_id"], "loss") == list(range(1, 9))
        model = server.model_of(run)
        assert model["info"]["status"] == "LOGGED_MODEL_READY" and model["info"]["name"] == "cls"
    finally:
        process.kill()
        server.stop()


def test_server_down_when_training_ends_keeps_the_training_and_a_rerun_only_logs(tmp_path):
    """The server dies after epoch 1 and is still down at the end: the stage
    fails saying the epochs are saved, writes no model output; started again,
    the re-run logs the run without training an epoch."""
    server = MlflowServer(tmp_path / "server").start()
    root = _toy_lab(tmp_path / "lab", {"cls": {**CLS, "training": {**CLS["training"], "epochs": 4, "batch_size": 8,
                                                                   "checkpoint_interval_s": 0}}})
    process = _train_process(root, "cls", server.url)
    try:
        _wait_for_state(root, "cls", process, lambda s: s["epoch"] >= 1)
        server.stop(signal.SIGKILL)
        _, err = process.communicate(timeout=300)
        assert process.returncode == 1, err
        assert ("train cls: the 4 epochs are trained and saved in checkpoints/cls, but the MLflow store "
                f"{server.url} failed (") in err
        assert not (root / "models").exists()
        assert json.loads((root / "checkpoints/cls/state.json").read_text())["epoch"] == 4

        server.start()
        again = _train_process(root, "cls", server.url)
        _, err = again.communicate(timeout=300)
        assert again.returncode == 0, err
        assert "resuming from checkpoint after epoch 4 of 4" in err and "epoch 1/4" not in err
        run = _only_run(server, "classifiers")
        assert run["info"]["status"] == "FINISHED"
        assert server.metric_steps(run["info"]["run_id"], "loss") == [1, 2, 3, 4]
        assert json.loads((root / "models/cls/run.json").read_text())["run_id"] == run["info"]["run_id"]
    finally:
        process.kill()
        server.stop()


def test_pipeline_and_two_queued_experiments_over_http_with_credentials_kept_secret(tmp_path):
    """dvc repro, then two experiments through ``dvc queue start -j 2``, all
    logging to one server over HTTP with user:password in MLFLOW_TRACKING_URI.
    Every run is recorded and FINISHED, metrics and artifacts read back through
    the REST API, and the password is nowhere: not in DVC's or the stages'
    output, the project's files, the runs' params and tags, or the artifacts."""
    secret = "s3cr3t-pa55"
    server = MlflowServer(tmp_path / "server").start()
    folder = tmp_path / "pets"
    builders.image_folder(folder, classes=("cat", "dog"), per_class=4, mode="L")
    archive = builders.tar_gz(folder, tmp_path / "pets.tar.gz")
    source = {"path": str(archive), "sha256": builders.sha256(archive.read_bytes())}
    project = make_project(tmp_path / "proj", pets_params(source, {"pets_cnn": PETS_CNN}))
    env = dvc_env(f"http://alice:{secret}@127.0.0.1:{server.port}")
    outputs = []
    try:
        first = run_dvc(project, "repro", env=env)
        outputs.append(first.stdout + first.stderr)
        assert ran(first.stdout) == {"download@pets", "prepare@pets", "train@pets_cnn", "evaluate@pets_cnn", "report"}
        git_commit(project, "baseline")
        for seed in (1, 2):
            queued = run_dvc(project, "exp", "run", "--queue", "-n", f"seed{seed}",
                             "-S", f"+experiments.pets_cnn.training.seed={seed}", env=env)
            outputs.append(queued.stdout + queued.stderr)
        run_dvc(project, "queue", "start", "-j", "2", env=env)
        status = wait_for_queue(project, env)
        assert status.count("Success") == 2, status
        for name in ("seed1", "seed2"):
            log = run_dvc(project, "queue", "logs", name, env=env, check=False)
            outputs.append(log.stdout + log.stderr)

        runs = server.runs("classifiers")
        by_exp = {tags(r).get("dvc_exp_name"): r for r in runs}
        assert len(runs) == 3 and set(by_exp) == {"", "seed1", "seed2"}, sorted(by_exp)
        for name, run in by_exp.items():
            run_id = run["info"]["run_id"]
            assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "pets_cnn"
            assert params(run)["training.seed"] == (name[-1] if name else "0")
            assert 0.0 <= metrics(run)["test_accuracy"] <= 1.0
            assert server.metric_steps(run_id, "loss") == [1]
            model = server.model_of(run)  # the logged model, its test metrics attached
            assert {m["key"] for m in model["data"]["metrics"]} >= {"test_accuracy", "test_loss"}
            png = server.artifact(run_id, "evaluation/confusion_matrix.png")
            assert png.startswith(b"\x89PNG")
            assert secret not in json.dumps(run)
        pipeline = server.runs("pipeline")
        assert len(pipeline) == 3 and all(r["info"]["status"] == "FINISHED" for r in pipeline)
        assert b"pets_cnn" in server.artifact(pipeline[0]["info"]["run_id"], "summary.md")

        assert not any(secret in text for text in outputs)
        leaks = [p for p in project.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        leaks += [p for p in server.root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert not leaks, leaks
        run_ref = json.loads((project / "models/pets_cnn/run.json").read_text())
        assert run_ref["tracking_uri"] == server.url  # what MLflow was given: no credentials
    finally:
        run_dvc(project, "queue", "stop", "--kill", env=env, check=False)
        server.stop()
