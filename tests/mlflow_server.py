"""A real ``mlflow server`` on 127.0.0.1 for tests, and a small client for its REST API.

The server runs with a SQLite backend and a local artifact store (served
through the server, ``--artifacts-destination``), in its own process group so
that stopping it takes its workers along. MLflow's job runner (only used by
its GenAI features) is switched off: its consumers would compete for the CPU.

:class:`TeamServer` is the team tracking server instead (``python -m
cluster.team_server``: PostgreSQL, several workers, optional basic auth) with
the same client; ``auth`` gives the client credentials.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from cluster.postgres import free_port

MLFLOW = Path(sys.executable).with_name("mlflow")
REPO = Path(__file__).resolve().parents[1]


class MlflowServer:
    def __init__(self, root: Path, port: int | None = None):
        self.root = root
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.auth: tuple[str, str] | None = None  # (user, password) the REST client sends
        root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _launch(self, log) -> subprocess.Popen:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        return subprocess.Popen(
            [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, timeout: float = 120.0) -> "MlflowServer":
        with open(self.root / "server.log", "ab") as log:
            self.process = self._launch(log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{(self.root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server not up in {timeout} s:\n{(self.root / 'server.log').read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.process and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=30)
        if self.process:
            try:  # workers left in the group (uvicorn) go too
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process = None

    # --- REST API (https://mlflow.org/docs/latest/rest-api.html), read back without the MLflow client

    def _open(self, url: str, body: dict | None = None) -> bytes:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.auth:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(self.auth).encode()).decode()
        request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                         headers=headers, method="GET" if body is None else "POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def get(self, endpoint: str, **query) -> dict:
        return json.loads(self._open(f"{self.url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"))

    def post(self, endpoint: str, body: dict) -> dict:
        return json.loads(self._open(f"{self.url}/api/2.0/mlflow/{endpoint}", body))

    def experiments(self) -> dict[str, str]:
        """{name: id} of every active experiment."""
        found = self.post("experiments/search", {"max_results": 1000})
        return {e["name"]: e["experiment_id"] for e in found.get("experiments", [])}

    def experiment_id(self, name: str) -> str:
        return self.get("experiments/get-by-name", experiment_name=name)["experiment"]["experiment_id"]

    def runs(self, experiment: str) -> list[dict]:
        found = self.post("runs/search", {"experiment_ids": [self.experiment_id(experiment)], "max_results": 1000})
        return found.get("runs", [])

    def logged_models(self, experiment: str) -> list[dict]:
        """The MLflow 3 logged models of ``experiment`` (each ``{"info": ..., "data": {"metrics": ...}}``)."""
        found = self.post("logged-models/search", {"experiment_ids": [self.experiment_id(experiment)],
                                                   "max_results": 100})
        return found.get("models", [])

    def model_of(self, run: dict) -> dict:
        """The one logged model that ``run`` (as runs/search returns it) output."""
        ids = {m["model_id"] for m in run.get("outputs", {}).get("model_outputs", [])}
        found = [m for m in self.logged_models(self.experiment_name(run["info"]["experiment_id"]))
                 if m["info"]["model_id"] in ids]
        assert len(found) == 1, (ids, found)
        return found[0]

    def experiment_name(self, experiment_id: str) -> str:
        return self.get("experiments/get", experiment_id=experiment_id)["experiment"]["name"]

    def metric_steps(self, run_id: str, key: str) -> list[int]:
        history = self.get("metrics/get-history", run_id=run_id, metric_key=key, max_results=10000)
        return sorted(m["step"] for m in history.get("metrics", []))

    def artifacts(self, run_id: str, path: str = "") -> list[str]:
        listed = self.get("artifacts/list", run_id=run_id, **({"path": path} if path else {}))
        return sorted(f["path"] for f in listed.get("files", []))

    def artifact(self, run_id: str, path: str) -> bytes:
        query = urllib.parse.urlencode({"path": path, "run_uuid": run_id})
        return self._open(f"{self.url}/get-artifact?{query}")


class TeamServer(MlflowServer):
    """``python -m cluster.team_server ARGS --port PORT`` as a process (its
    output in ``root/server.log``), with the same REST client. :meth:`stop`
    sends it SIGTERM, as a user's Ctrl-C would: it stops its ``mlflow
    server`` and the PostgreSQL it started; the exit code is returned."""

    def __init__(self, root: Path, args: list[str], port: int | None = None, env: dict | None = None):
        super().__init__(root, port)
        self.args, self.env = args, env or {}

    def _launch(self, log) -> subprocess.Popen:
        env = {**os.environ, **self.env}
        env.pop("MLFLOW_TRACKING_URI", None)
        return subprocess.Popen([sys.executable, "-m", "cluster.team_server", "--port", str(self.port), *self.args],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        code = None
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            code = self.process.wait(timeout=90)
        self.process = None
        return code


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def metrics(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
