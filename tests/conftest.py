"""Shared fixtures: a project folder with params.yaml, a real HTTP server on
127.0.0.1, and every test's os.environ and MLflow store put back as it found them."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml


def pytest_collection_modifyitems(items):
    """Tests marked ``heavy`` (real pipelines, servers, clusters: a minute or
    more each) go first, the rest after them in their order. With ``make
    test``'s workers handed a test at a time (``--maxschedchunk 1``), the
    long ones are spread over the workers from the start and the short ones
    fill the end, so the workers finish together."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


@pytest.fixture(autouse=True)
def _environment_put_back():
    """A stage run in-process sets variables for MLflow in os.environ (its
    HTTP limits, the credentials taken out of a tracking URI); left there, they
    reach every later test's subprocesses on the same xdist worker (a
    training given alice's URI once sent an earlier test's user instead)."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _mlflow_store_put_back():
    """A stage run in-process points MLflow at its store with
    ``mlflow.set_tracking_uri``, which outranks ``MLFLOW_TRACKING_URI``: left
    set, a later test's ``MlflowClient()`` wrote into that store instead of
    its own (an experiment "e" then already existed)."""
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        server.hits[self.path] += 1
        if server.failures.get(self.path, 0) > 0:
            server.failures[self.path] -= 1
            self.send_error(503, "try again")
            return
        super().do_GET()

    def copyfile(self, source, outputfile):
        rate = self.server.throttle.get(self.path)
        if not rate:
            return shutil.copyfileobj(source, outputfile)
        while chunk := source.read(max(1, rate // 20)):  # ``rate`` bytes a second, in 50 ms steps
            outputfile.write(chunk)
            outputfile.flush()
            time.sleep(0.05)

    def log_message(self, *args):  # keep test output quiet
        pass


class LocalServer:
    """A ThreadingHTTPServer serving ``root``; can fail the next N requests of a
    path, or send a path slowly (``throttle``, bytes a second)."""

    def __init__(self, root: Path):
        handler = functools.partial(_Handler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.hits = Counter()
        self.httpd.failures = {}
        self.httpd.throttle = {}
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def hits(self) -> Counter:
        return self.httpd.hits

    def fail_next(self, path: str, times: int) -> None:
        self.httpd.failures[path] = times

    def throttle(self, path: str, bytes_per_second: int) -> None:
        self.httpd.throttle[path] = bytes_per_second

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_root(tmp_path) -> Path:
    root = tmp_path / "served"
    root.mkdir()
    return root


@pytest.fixture
def server(http_root):
    srv = LocalServer(http_root)
    yield srv
    srv.close()


class Project(type(Path())):
    """A project folder path whose ``write(params)`` saves its params.yaml."""

    def write(self, params: dict) -> Path:
        path = self / "params.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty project folder as the working directory."""
    root = Project(tmp_path / "project")
    root.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.delenv("DATA_MIRROR", raising=False)
    return root


def params_for(datasets: dict, **sections) -> dict:
    """A params mapping with fast download settings for tests."""
    base = {"download": {"retries": 2, "timeout_s": 5, "backoff_s": 0.01, "cache_dir": "data/cache"},
            "datasets": datasets}
    base.update(sections)
    return base
