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
    """A classifier (loss and accuracy) trained on one device, then on two."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    from mlflow.tracking import MlflowClient

    # no dropout: on TensorFlow each replica draws its own masks, so only a deterministic model can match;
    # 600 training images at batch 16: 37 full batches and a last one of 8, split 4 + 4
    cls = {**CLS, "model": {**CLS["model"], "dropout": 0.0}, "training": {**CLS["training"], "epochs": 3,
                                                                          "batch_size": 16}}
    experiments = {"one": cls, "two": {**cls, "training": {**cls["training"], "distribution": "data_parallel"}}}
    root = _lab(tmp_path / "lab", experiments)
    for name, replicas in (("one", 1), ("two", 2)):
        result = _train(root, name, backend)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"backend {backend}, {replicas} replica(s)" in result.stderr
    one = json.loads((root / "models/one/history.json").read_text())
    two = json.loads((root / "models/two/history.json").read_text())
    assert set(one) == set(two) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=TOLERANCE, err_msg=key)
    assert one["loss"][-1] < one["loss"][0]  # it trained
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = {r.info.run_name: r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])}
    assert runs["two"].data.params["replicas"] == "2" and runs["one"].data.params["replicas"] == "1"
    assert runs["two"].data.params["training.distribution"] == "data_parallel"


def test_a_batch_that_does_not_split_over_the_devices_is_refused(tmp_path):
    odd = {**AE, "training": {**AE["training"], "batch_size": 15, "distribution": "data_parallel"}}
    root = _lab(tmp_path / "lab", {"odd": odd})
    result = _train(root, "odd", "tensorflow")
    assert result.returncode == 1
    assert ("experiments.odd.training.batch_size: 15 does not split evenly over 2 devices; use a multiple of 2"
            in result.stderr)
    assert not (root / "models").exists()
