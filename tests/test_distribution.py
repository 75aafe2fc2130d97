"""Data-parallel training (``training.distribution: data_parallel``) on two
virtual CPU devices, through each installed backend's own engine: the same
losses as on one device, and a batch that does not split is refused."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.images import save
from test_train import AE, CLS, _dataset

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # relative, per epoch and metric: only the order of floating-point reductions differs


def _lab(root: Path, experiments: dict) -> Path:
    root.mkdir()
    save(root / "data/prepared/toy.npz", _dataset(n=(600, 100, 100), shape=(16, 16, 1)))
    (root / "params.yaml").write_text(yaml.safe_dump({
        "limits": {"max_samples": None, "max_epochs": None},
        "datasets": {"toy": {"source": {"path": "unused.zip"}}}, "experiments": experiments}))
    return root


def _train(root: Path, name: str, backend: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KERAS_BACKEND": backend, "IMAGEPIPE_CPU_DEVICES": "2", "TF_CPP_MIN_LOG_LEVEL": "3",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "stages.train", name], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_two_cpu_devices_give_the_losses_of_one(tmp_path, backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    from mlflow.tracking import MlflowClient

    ae = {**AE, "training": {**AE["training"], "epochs": 3, "batch_size": 16}}  # 600 = 37 batches + 8
    # no dropout: on TensorFlow each replica draws its own masks, so only a deterministic model can match
    cls = {**CLS, "model": {**CLS["model"], "dropout": 0.0}, "training": {**CLS["training"], "epochs": 3,
                                                                          "batch_size": 16}}
    parallel = {"training": {"distribution": "data_parallel"}}
    experiments = {"ae": ae, "cls": cls,
                   "ae_dp": {**ae, "training": {**ae["training"], **parallel["training"]}},
                   "cls_dp": {**cls, "training": {**cls["training"], **parallel["training"]}}}
    root = _lab(tmp_path / "lab", experiments)
    for name in experiments:
        result = _train(root, name, backend)
        assert result.returncode == 0, result.stderr[-3000:]
        replicas = 2 if name.endswith("_dp") else 1
        assert f"backend {backend}, {replicas} replica(s)" in result.stderr
    for name in ("ae", "cls"):
        one = json.loads((root / f"models/{name}/history.json").read_text())
        two = json.loads((root / f"models/{name}_dp/history.json").read_text())
        assert one.keys() == two.keys()
        for key in one:
            np.testing.assert_allclose(two[key], one[key], rtol=TOLERANCE, err_msg=f"{name} {key}")
        assert one["loss"][-1] < one["loss"][0]  # it trained
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = {r.info.run_name: r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])}
    assert runs["ae_dp"].data.params["replicas"] == "2" and runs["ae"].data.params["replicas"] == "1"
    assert runs["ae_dp"].data.params["training.distribution"] == "data_parallel"


def test_a_batch_that_does_not_split_over_the_devices_is_refused(tmp_path):
    odd = {**AE, "training": {**AE["training"], "batch_size": 15, "distribution": "data_parallel"}}
    root = _lab(tmp_path / "lab", {"odd": odd})
    result = _train(root, "odd", "tensorflow")
    assert result.returncode == 1
    assert ("experiments.odd.training.batch_size: 15 does not split evenly over 2 devices; use a multiple of 2"
            in result.stderr)
    assert not (root / "models").exists()
