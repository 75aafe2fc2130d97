"""Data-parallel training (``training.distribution: data_parallel``) on two
virtual CPU devices, through each installed backend's own engine, and as two
processes joined by ``jax.distributed`` on this host (as two hosts would
be): the same losses as on one device; a batch that does not split is
refused, and processes that disagree stop with the same error."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.images import save
from test_train import AE, CLS, _dataset

pytestmark = pytest.mark.heavy  # real pipelines, servers or clusters: scheduled first (conftest.py)

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # relative, per epoch and metric: only the order of floating-point reductions differs


def _lab(root: Path, experiments: dict, n=(600, 100, 100)) -> Path:
    root.mkdir()
    save(root / "data/prepared/toy.npz", _dataset(n=n, shape=(16, 16, 1)))
    (root / "params.yaml").write_text(yaml.safe_dump({
        "limits": {"max_samples": None, "max_epochs": None},
        "datasets": {"toy": {"source": {"path": "unused.zip"}}}, "experiments": experiments}))
    return root


def _env(root: Path, backend: str, **more) -> dict:
    return {**os.environ, "KERAS_BACKEND": backend, "IMAGEPIPE_CPU_DEVICES": "2", "TF_CPP_MIN_LOG_LEVEL": "3",
            "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PYTHONPATH": str(REPO), **more}


def _train(root: Path, name: str, backend: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.train", name], cwd=root, env=_env(root, backend, **env),
                          capture_output=True, text=True, timeout=600)


def _start_processes(roots: list[Path], name: str) -> list[tuple[subprocess.Popen, object]]:
    """``stages.train name`` as one process per project folder (process i in
    ``roots[i]``, as on host i), joined by jax.distributed over 127.0.0.1,
    one CPU device each; each with its log file."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = []
    for index, root in enumerate(roots):
        env = _env(root, "jax", KERAS_DISTRIBUTION_JOB_ADDRESSES=f"127.0.0.1:{port}",
                   KERAS_DISTRIBUTION_NUM_PROCESSES=str(len(roots)), KERAS_DISTRIBUTION_PROCESS_ID=str(index))
        del env["IMAGEPIPE_CPU_DEVICES"]
        log = open(root / f"process-{index}.log", "w+")  # files, not pipes: neither process waits on the other's
        processes.append((subprocess.Popen([sys.executable, "-m", "stages.train", name], cwd=root, env=env,
                                           stdout=log, stderr=subprocess.STDOUT), log))
    return processes


def _finish(processes: list[tuple[subprocess.Popen, object]]) -> list[tuple[int, str]]:
    """Wait for the processes; their exit codes and logs."""
    results = []
    for process, log in processes:
        try:
            code = process.wait(timeout=600)
        finally:
            process.kill()
        log.seek(0)
        results.append((code, log.read()))
        log.close()
    return results


def _train_as_processes(roots: list[Path], name: str) -> list[tuple[int, str]]:
    return _finish(_start_processes(roots, name))


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


def _runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


jax_only = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")


@jax_only
def test_two_processes_train_one_model_with_the_losses_of_one_device(tmp_path):
    """Two processes (as two hosts would be) train one classifier through
    jax.distributed, each feeding its half of every batch: the losses and
    accuracy of one device; process 0 alone writes the model and the one
    MLflow run, and the other process's checkpoints and outputs are none."""
    cls = {**CLS, "model": {**CLS["model"], "dropout": 0.0}, "training": {**CLS["training"], "epochs": 3,
                                                                          "batch_size": 16}}
    root = _lab(tmp_path / "lab", {"one": cls, "two": {**cls, "training": {**cls["training"],
                                                                           "distribution": "data_parallel"}}})
    other = tmp_path / "other-host"
    shutil.copytree(root, other)
    result = _train(root, "one", "jax", IMAGEPIPE_CPU_DEVICES="")
    assert result.returncode == 0, result.stderr[-3000:]
    (chief, chief_log), (worker, worker_log) = _train_as_processes([root, other], "two")
    assert chief == 0 and worker == 0, (chief_log[-3000:], worker_log[-3000:])
    assert "over 2 cpu device(s) in 2 process(es), this one 0" in chief_log
    assert "over 2 cpu device(s) in 2 process(es), this one 1" in worker_log
    assert "process 1 of 2 done" in worker_log and "left out" not in chief_log
    # each epoch logged by both; only process 0's line has a checkpoint and tracking time (it alone writes)
    assert chief_log.count("then checkpoint") == 3 and "epoch 3/3 in" in worker_log
    assert "then checkpoint" not in worker_log
    one = json.loads((root / "models/one/history.json").read_text())
    two = json.loads((root / "models/two/history.json").read_text())
    assert set(one) == set(two) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=TOLERANCE, err_msg=key)
    assert one["loss"][-1] < one["loss"][0]
    assert (root / "models/two/model.keras").is_file() and (root / "checkpoints/two/state.json").is_file()
    assert not (other / "models").exists() and not (other / "checkpoints").exists()
    assert not (other / "mlflow.db").exists()
    runs = {r.info.run_name: r for r in _runs(root)}
    assert sorted(runs) == ["one", "two"]
    assert runs["two"].data.params["processes"] == "2" and runs["two"].data.params["replicas"] == "2"
    assert runs["one"].data.params["processes"] == "1"
    assert runs["two"].info.status == "FINISHED"


@jax_only
def test_processes_with_other_params_stop_with_the_same_error(tmp_path):
    """A host whose params.yaml differs (another seed) would train another
    model: every process stops with the error naming it, before anything is
    written."""
    two = {**CLS, "training": {**CLS["training"], "distribution": "data_parallel"}}
    root = _lab(tmp_path / "lab", {"two": two})
    other = tmp_path / "other-host"
    shutil.copytree(root, other)
    params = yaml.safe_load((other / "params.yaml").read_text())
    params["experiments"]["two"]["training"]["seed"] = 7
    (other / "params.yaml").write_text(yaml.safe_dump(params))
    for code, log in _train_as_processes([root, other], "two"):
        assert code == 1, log[-3000:]
        assert "the params and data (every host needs the same params.yaml and data files: dvc pull) differs " \
               "between the 2 processes" in log
    for folder in (root, other):
        assert not (folder / "models").exists() and not (folder / "checkpoints").exists()


@jax_only
def test_processes_killed_together_resume_from_process_0s_checkpoint(tmp_path):
    """Both processes killed after epoch 2 (a preempted job): process 0's
    checkpoint is the only one, so a rerun where the other host has none
    stops both with the error saying so; with the checkpoint folder copied
    there, both resume from it and finish the one MLflow run."""
    cls = {**CLS, "model": {**CLS["model"], "dropout": 0.0},
           "training": {**CLS["training"], "epochs": 12, "distribution": "data_parallel", "checkpoint_interval_s": 0}}
    root = _lab(tmp_path / "lab", {"two": cls})
    other = tmp_path / "other-host"
    shutil.copytree(root, other)
    processes = _start_processes([root, other], "two")
    try:
        deadline = time.monotonic() + 300
        while "epoch 2/12" not in (root / "process-0.log").read_text() and time.monotonic() < deadline:
            assert all(process.poll() is None for process, _ in processes), (root / "process-0.log").read_text()
            time.sleep(0.2)
    finally:
        for process, _ in processes:
            process.kill()
    _finish(processes)
    state = json.loads((root / "checkpoints/two/state.json").read_text())
    assert 2 <= state["epoch"] < 12 and not (other / "checkpoints").exists()
    for code, log in _train_as_processes([root, other], "two"):
        assert code == 1, log[-3000:]
        assert (f"the epoch to resume from (checkpoints/two/ must be one shared folder, the same copy on every host, "
                f"or absent on every host) differs between the 2 processes (process 0: {state['epoch']}, process 1: 0)"
                in log)
    assert json.loads((root / "checkpoints/two/state.json").read_text())["epoch"] == state["epoch"]  # kept
    shutil.copytree(root / "checkpoints", other / "checkpoints")
    (chief, chief_log), (worker, worker_log) = _train_as_processes([root, other], "two")
    assert chief == 0 and worker == 0, (chief_log[-3000:], worker_log[-3000:])
    assert f"resuming from checkpoint after epoch {state['epoch']} of 12" in chief_log
    assert f"resuming from checkpoint after epoch {state['epoch']} of 12" in worker_log
    history = json.loads((root / "models/two/history.json").read_text())
    assert len(history["loss"]) == 12 and history["loss"][:state["epoch"]] == state["history"]["loss"]
    (run,) = _runs(root)
    assert run.info.run_id == state["run_id"] and run.info.status == "FINISHED"


@jax_only
def test_a_last_batch_that_does_not_split_over_the_devices_is_cut(tmp_path):
    """JAX places an equal share of every batch on each device: 701 training
    images at batch 16 end in a batch of 13, cut to 12 (one image left out,
    said in the log), and 101 validation images end in 5, cut to 4."""
    cls = {**CLS, "training": {**CLS["training"], "epochs": 1, "distribution": "data_parallel"}}
    root = _lab(tmp_path / "lab", {"two": cls}, n=(601, 100, 101))
    result = _train(root, "two", "jax")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("the last batch must split evenly over 2 devices: 1 of the training images (a different few each "
            "epoch) and 1 of the validation images are left out of every epoch") in result.stderr
    assert (root / "models/two/model.keras").is_file()


def test_several_tensorflow_workers_are_refused_with_the_reason(tmp_path):
    """Keras 3's Model.fit fails under MultiWorkerMirroredStrategy; the stage
    says so and what to use instead, before training."""
    two = {**CLS, "training": {**CLS["training"], "distribution": "data_parallel"}}
    root = _lab(tmp_path / "lab", {"two": two})
    cluster = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 0}}
    result = _train(root, "two", "tensorflow", TF_CONFIG=json.dumps(cluster))
    assert result.returncode == 1
    assert ("experiments.two.training.distribution: several TensorFlow workers (TF_CONFIG is set) are not "
            "supported") in result.stderr
    assert "keras-team/keras#20585" in result.stderr and "KERAS_BACKEND=jax" in result.stderr
    assert not (root / "models").exists() and not (root / "checkpoints").exists()
