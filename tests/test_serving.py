"""The champion answers predictions: ``mlflow models serve`` of a registered
model's ``@champion`` (trained and promoted by the real train and evaluate
stages), on 127.0.0.1, asked over HTTP as the README's curl command asks it;
the answer is the model's own ``predict``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cluster.postgres import free_port
from stages import evaluate as evaluate_mod
from stages import train as train_mod
from stages.images import to_unit_float
from test_train import AE, CLS, _dataset, _params, lab  # noqa: F401 - lab: the fixture

pytestmark = pytest.mark.heavy  # real pipelines, servers or clusters: scheduled first (conftest.py)

MLFLOW = Path(sys.executable).with_name("mlflow")


def _serve(model_uri: str, root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(root / f"serve-{port}.log", "wb")
    process = subprocess.Popen([str(MLFLOW), "models", "serve", "-m", model_uri, "--env-manager", "local",
                                "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "PATH": f"{MLFLOW.parent}{os.pathsep}{os.environ['PATH']}"})
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mlflow models serve exited:\n{(root / f'serve-{port}.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    os.killpg(process.pid, signal.SIGTERM)
    raise AssertionError(f"mlflow models serve did not answer /ping:\n{(root / f'serve-{port}.log').read_text()}")


def _ask(url: str, images: np.ndarray) -> np.ndarray:
    body = json.dumps({"inputs": images.tolist()}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return np.asarray(json.loads(response.read())["predictions"], np.float32)


@pytest.mark.parametrize("name, experiment", [("ae", AE), ("cls", CLS)])
def test_the_champion_is_served_and_answers_as_the_model_predicts(lab, name, experiment):  # noqa: F811
    import keras

    _params(lab, {name: experiment})
    assert train_mod.main([name]) == 0 and evaluate_mod.main([name]) == 0
    images = to_unit_float(_dataset().splits["test"].images[:5])
    expected = np.asarray(keras.models.load_model(lab / f"models/{name}/model.keras").predict(images, verbose=0))
    process, url = _serve(f"models:/{name}@champion", lab)
    try:
        answer = _ask(url, images)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    assert answer.shape == expected.shape == ((5, 8, 8, 1) if name == "ae" else (5, 3))
    np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-6)
    if name == "cls":
        np.testing.assert_allclose(answer.sum(axis=1), 1.0, rtol=1e-5)  # class probabilities
