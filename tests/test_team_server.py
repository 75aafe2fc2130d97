"""The team tracking server (``python -m cluster.team_server``) for real: a
PostgreSQL of its own (Debian's postgresql), ``mlflow server`` with several
workers, artifacts in a folder of their own, basic auth; the DVC pipeline and
queued experiments over HTTP, a PostgreSQL restarted while a training logs,
and the command's errors on bad input."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import builders
from cluster import team_server
from cluster.postgres import Postgres, free_port
from dvc_helpers import dvc_env, git_commit, make_project, pets_params, ran, run_dvc, wait_for_queue
from mlflow_server import TeamServer, metrics, params, tags
from test_pipeline import PETS_CNN
from test_train import CLS, _toy_lab, _train_process, _wait_for_state

pytestmark = pytest.mark.heavy  # real pipelines, servers or clusters: scheduled first (conftest.py)

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def reachable() -> Path:
    """A folder the ``postgres`` user can reach when the tests run as root (pytest's tmp_path is 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="team-"))
    folder.chmod(0o755)
    yield folder
    if (folder / "pg" / "data").exists():  # a test that failed half-way
        Postgres(folder / "pg" / "data").stop("immediate")
    shutil.rmtree(folder, ignore_errors=True)


def _cluster(folder: Path) -> Postgres:
    """The PostgreSQL that ``--postgres folder`` started, as an object (its port from postmaster.pid)."""
    data = folder / "data"
    return Postgres(data, port=int((data / "postmaster.pid").read_text().splitlines()[3]))


def _stopped_cleanly(server: TeamServer, pg_folder: Path | None = None) -> None:
    port = server.port
    assert server.stop() == 0, server.root.joinpath("server.log").read_text()[-3000:]
    team_server.check_port("127.0.0.1", port)  # every worker gone: the port is free again
    if pg_folder:
        assert not Postgres(pg_folder / "data").running()


def test_pipeline_and_two_queued_experiments_on_postgresql(tmp_path, reachable):
    """make team-server's setup (--postgres DIR, artifacts in a folder, 2
    workers): dvc repro, then two experiments through dvc queue start -j 2
    while four more writers log 12 runs beside them.
    Every run FINISHED with each epoch's metrics once, its logged model and
    artifacts read back over REST; the runs are rows of PostgreSQL and the
    artifacts files of the artifact folder; SIGTERM stops the server and
    PostgreSQL."""
    artifacts = reachable / "artifacts"
    server = TeamServer(tmp_path / "server", ["--postgres", str(reachable / "pg"), "--artifacts-destination",
                                              str(artifacts), "--workers", "2"])
    started = time.monotonic()
    server.start()
    log.info("PostgreSQL (initdb included) and mlflow server up in %.1f s", time.monotonic() - started)
    folder = tmp_path / "pets"
    builders.image_folder(folder, classes=("cat", "dog"), per_class=4, mode="L")
    archive = builders.tar_gz(folder, tmp_path / "pets.tar.gz")
    source = {"path": str(archive), "sha256": builders.sha256(archive.read_bytes())}
    two_epochs = {**PETS_CNN, "training": {**PETS_CNN["training"], "epochs": 2}}
    project = make_project(tmp_path / "proj", pets_params(source, {"pets_cnn": two_epochs}))
    env = dvc_env(server.url)
    try:
        first = run_dvc(project, "repro", env=env)
        assert ran(first.stdout) == {"download@pets", "prepare@pets", "train@pets_cnn", "evaluate@pets_cnn", "report"}
        git_commit(project, "baseline")
        for seed in (1, 2):  # 6 epochs: long enough for the writers below to log beside them
            run_dvc(project, "exp", "run", "--queue", "-n", f"seed{seed}",
                    "-S", "experiments.pets_cnn.training.epochs=6",
                    "-S", f"+experiments.pets_cnn.training.seed={seed}", env=env)
        # two queued experiments training side by side and, once one of them
        # logs, four writers logging as fast as they can (benchmarks/bench_tracking.py)
        load_json = tmp_path / "load.json"
        run_dvc(project, "queue", "start", "-j", "2", env=env)
        deadline = time.monotonic() + 300
        while not any(r["info"]["status"] == "RUNNING" for r in server.runs("classifiers")):
            assert time.monotonic() < deadline, "no queued experiment started within 300 s"
            time.sleep(0.5)
        load = subprocess.run([sys.executable, "-m", "benchmarks.bench_tracking", "--uri", server.url,
                               "--writers", "4", "--runs", "3", "--epochs", "20", "--json", str(load_json)],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        status = wait_for_queue(project, env)
        assert status.count("Success") == 2, status
        assert load.returncode == 0, load.stderr[-3000:]
        row = json.loads(load_json.read_text())["rows"][0]  # its read-back: each run once, every point once
        assert row["runs"] == 12 and row["error_count"] == 0 and row["problems"] == [], row

        runs = server.runs("classifiers")
        by_exp = {tags(r).get("dvc_exp_name"): r for r in runs}
        assert len(runs) == 3 and set(by_exp) == {"", "seed1", "seed2"}, sorted(by_exp)
        for name, run in by_exp.items():
            run_id = run["info"]["run_id"]
            assert run["info"]["status"] == "FINISHED"
            assert params(run)["training.seed"] == (name[-1] if name else "0")
            assert 0.0 <= metrics(run)["test_accuracy"] <= 1.0
            for key in ("loss", "val_loss", "accuracy"):
                assert server.metric_steps(run_id, key) == list(range(1, 7 if name else 3)), (name, key)
            model = server.model_of(run)
            assert model["info"]["status"] == "LOGGED_MODEL_READY" and model["info"]["name"] == "pets_cnn"
            assert {m["key"] for m in model["data"]["metrics"]} >= {"test_accuracy", "test_loss"}
            assert "evaluation/confusion_matrix.png" in server.artifacts(run_id, "evaluation")
            assert server.artifact(run_id, "evaluation/confusion_matrix.png").startswith(b"\x89PNG")
        writes = [(int(r["info"]["start_time"]), int(r["info"]["end_time"])) for r in server.runs("load")]
        first, last = min(w[0] for w in writes), max(w[1] for w in writes)
        assert any(int(by_exp[n]["info"]["start_time"]) < last and int(by_exp[n]["info"]["end_time"]) > first
                   for n in ("seed1", "seed2")), "the writers did not log while a queued experiment ran"
        pipeline = server.runs("pipeline")
        assert len(pipeline) == 3 and all(r["info"]["status"] == "FINISHED" for r in pipeline)

        pg = _cluster(reachable / "pg")
        assert pg.sql("SELECT count(*) FROM runs WHERE status = 'FINISHED'", database="mlflow").strip() == "18"
        assert len(list(artifacts.rglob("confusion_matrix.png"))) == 3
    finally:
        run_dvc(project, "queue", "stop", "--kill", env=env, check=False)
        _stopped_cleanly(server, reachable / "pg")


def test_basic_auth_refuses_anonymous_requests_and_keeps_passwords_secret(tmp_path, reachable):
    """--auth: the admin (MLFLOW_AUTH_ADMIN_PASSWORD) creates a user in the
    mlflow_auth database; a request without credentials, or with a wrong
    password, gets 401; a training with user:password@ in its tracking URI
    logs its run; neither password is in any log, param, tag or file. Options
    after -- reach mlflow server."""
    admin_password, password = "adm1n-Pa55-word", "al1ce-Pa55-word"
    server = TeamServer(tmp_path / "server", ["--postgres", str(reachable / "pg"), "--auth", "--workers", "2",
                                              "--artifacts-destination", str(reachable / "artifacts"),
                                              "--", "--x-frame-options", "DENY"],
                        env={"MLFLOW_AUTH_ADMIN_PASSWORD": admin_password})
    server.start()
    root = _toy_lab(tmp_path / "lab", {"cls": {**CLS, "training": {**CLS["training"], "epochs": 2}}})
    try:
        with urllib.request.urlopen(f"{server.url}/health", timeout=10) as health:
            assert health.headers["X-Frame-Options"] == "DENY"  # mlflow server's default is SAMEORIGIN
        for credentials in (None, ("alice", "wrong")):
            server.auth = credentials
            with pytest.raises(urllib.error.HTTPError) as refused:
                server.experiments()
            assert refused.value.code == 401
        server.auth = ("admin", admin_password)
        server.post("users/create", {"username": "alice", "password": password})
        assert "alice" in _cluster(reachable / "pg").sql("SELECT username FROM users", database="mlflow_auth")

        process = _train_process(root, "cls", f"http://alice:{password}@127.0.0.1:{server.port}")
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        runs = server.runs("classifiers")
        assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED"
        assert runs[0]["info"]["user_id"] == "alice"
        assert server.metric_steps(runs[0]["info"]["run_id"], "loss") == [1, 2]
        assert json.loads((root / "models/cls/run.json").read_text())["tracking_uri"] == server.url
        for secret in (password, admin_password):
            assert secret not in err and secret not in json.dumps(runs)
            leaks = [p for folder in (root, server.root, reachable / "artifacts") for p in folder.rglob("*")
                     if p.is_file() and secret.encode() in p.read_bytes()]
            assert not leaks, leaks
    finally:
        _stopped_cleanly(server, reachable / "pg")


def test_postgresql_restarted_while_a_training_logs_loses_nothing(tmp_path, reachable):
    """PostgreSQL stopped as a crash would (immediate) after epoch 2 of 8 and
    started again 5 s later, while the training logs: the server answers 500
    meanwhile, the training keeps the epochs and sends them later, and MLflow's
    connection pool (pre-ping) recovers without a restart of the server. The
    run ends FINISHED with every epoch's metrics once and its model."""
    pg = Postgres(reachable / "pg").start()
    uri = pg.database("mlflow")
    server = TeamServer(tmp_path / "server", ["--workers", "2", "--artifacts-destination",
                                              str(reachable / "artifacts")],
                        env={"MLFLOW_BACKEND_STORE_URI": uri})  # the password off the command line
    server.start()
    root = _toy_lab(tmp_path / "lab", {"cls": {**CLS, "training": {**CLS["training"], "epochs": 8, "batch_size": 8,
                                                                   "checkpoint_interval_s": 0}}})
    process = _train_process(root, "cls", server.url)
    try:
        _wait_for_state(root, "cls", process, lambda s: s["epoch"] >= 2)
        down_at = time.monotonic()
        restart = threading.Thread(target=pg.restart, kwargs={"mode": "immediate", "down_s": 5})
        restart.start()
        state = _wait_for_state(root, "cls", process, lambda s: s["epoch"] >= 4)  # it trains on meanwhile
        process.send_signal(signal.SIGSTOP)  # the last epochs wait for the database (a long epoch stands in)
        restart.join()
        back_at = time.monotonic()
        process.send_signal(signal.SIGCONT)
        _, err = process.communicate(timeout=300)
        log.info("database down from epoch 2 for %.1f s (restart done at epoch %d); training's warnings: %s",
                 back_at - down_at, state["epoch"],
                 [line for line in err.splitlines() if "did not answer" in line])
        assert process.returncode == 0, err
        assert "did not answer (" in err and "are kept and sent later" in err
        runs = server.runs("classifiers")
        assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED"
        for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
            assert server.metric_steps(runs[0]["info"]["run_id"], key) == list(range(1, 9)), key
        model = server.model_of(runs[0])
        assert model["info"]["status"] == "LOGGED_MODEL_READY" and model["info"]["name"] == "cls"
    finally:
        process.kill()
        _stopped_cleanly(server)
        pg.remove()


def test_kill_9_of_the_command_leaves_nothing_in_the_way_of_the_next_start(tmp_path, reachable):
    """The server dies with the command (no worker keeps the port); its
    PostgreSQL, left running, is stopped and started again by the next start
    on the same folder, which finds the data under the saved password."""
    args = ["--postgres", str(reachable / "pg"), "--workers", "2", "--artifacts-destination",
            str(reachable / "artifacts")]
    first = TeamServer(tmp_path / "first", args).start()
    first.post("experiments/create", {"name": "kept"})
    first.process.kill()
    first.process.wait()
    deadline = time.monotonic() + 30
    while True:
        try:
            team_server.check_port("127.0.0.1", first.port)
            break
        except team_server.TeamServerError:
            assert time.monotonic() < deadline, "the server outlived its command"
            time.sleep(0.2)
    assert _cluster(reachable / "pg").running()
    second = TeamServer(tmp_path / "second", args, port=first.port).start()
    try:
        assert "kept" in second.experiments()
        assert "a PostgreSQL left running in" in (second.root / "server.log").read_text()
    finally:
        _stopped_cleanly(second, reachable / "pg")


@pytest.mark.parametrize("argv, error", [
    (["--backend-store-uri", "postgresql://mlflow:pw-at-fault@127.0.0.1:{free}/mlflow"],
     "database postgresql://***@127.0.0.1:{free}/mlflow unreachable: connection failed: "),
    (["--backend-store-uri", "mysql://mlflow:pw-at-fault@db.example/mlflow"],
     "backend store mysql://***@db.example/mlflow: scheme 'mysql' is not supported"),
    (["--backend-store-uri", "postgres://mlflow:pw-at-fault@db.example/mlflow"],
     "scheme 'postgres' is not supported (write postgresql://)"),
    (["--backend-store-uri", "sqlite:///x.db", "--port", "{busy}"], "port {busy} on 127.0.0.1 is not free"),
    (["--backend-store-uri", "sqlite:///x.db", "--auth"], "--auth needs the admin's password"),
    (["--backend-store-uri", "sqlite:///x.db", "--auth", "--admin-password-file", "/nonexistent/pw"],
     "--admin-password-file /nonexistent/pw: No such file or directory"),
    (["--backend-store-uri", "postgresql://mlflow:pw-at-fault@127.0.0.1/mlflow", "--auth"],
     "--auth needs the admin's password"),
    ([], "no backend store: pass --postgres DIR or --backend-store-uri URI"),
    (["--backend-store-uri", "sqlite:///x.db", "--workers", "0"], "--workers 0: give 1 or more"),
])
def test_bad_input_is_one_clear_error_and_exit_1(tmp_path, monkeypatch, caplog, argv, error):
    """Nothing starts; the password in a URI at fault is never shown."""
    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    values = {"free": free_port(), "busy": busy.getsockname()[1]}
    argv = [a.format(**values) for a in argv]
    if "--port" not in argv:
        argv += ["--port", str(free_port())]
    try:
        assert team_server.main(argv) == 1
    finally:
        busy.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and error.format(**values) in errors[0], errors
    assert "pw-at-fault" not in caplog.text
    assert not list(tmp_path.iterdir())  # no store, no artifacts folder


@pytest.mark.skipif(importlib.util.find_spec("boto3") is not None, reason="boto3 is installed")
def test_an_s3_artifact_store_without_boto3_is_refused(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    assert team_server.main(["--backend-store-uri", "sqlite:///x.db", "--port", str(free_port()),
                             "--artifacts-destination", "s3://team-bucket/mlflow"]) == 1
    assert "--artifacts-destination s3://team-bucket/mlflow: the server needs boto3 for S3" in caplog.text
    assert not list(tmp_path.iterdir())


def test_a_short_admin_password_is_refused_before_anything_starts(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "short-pw")
    assert team_server.main(["--backend-store-uri", "sqlite:///x.db", "--auth", "--port", str(free_port())]) == 1
    assert "the admin's password has 8 characters: MLflow's basic auth takes 12 or more" in caplog.text
    assert "short-pw" not in caplog.text and not list(tmp_path.iterdir())


def test_a_wrong_database_password_is_a_clear_error(tmp_path, reachable, caplog):
    pg = Postgres(reachable / "pg").start()
    try:
        pg.database("mlflow")
        wrong = f"postgresql://mlflow:not-the-password@127.0.0.1:{pg.port}/mlflow"
        assert team_server.main(["--backend-store-uri", wrong, "--port", str(free_port()),
                                 "--artifacts-destination", str(tmp_path / "artifacts")]) == 1
    finally:
        pg.remove()
    assert (f"database postgresql://***@127.0.0.1:{pg.port}/mlflow unreachable: connection failed: "
            in caplog.text and 'password authentication failed for user "mlflow"' in caplog.text)
    assert "not-the-password" not in caplog.text
