"""The launch of one training over several hosts (``python -m cluster.launch``):
the KERAS_DISTRIBUTION_* variables worked out from SkyPilot's variables and
from a Ray placement, with the errors for input that does not fit; two
processes launched as two SkyPilot nodes, and as two bundles of a Ray
placement group on two local Ray nodes, train one classifier to the losses
of one device; a failing process fails the launch, naming it and its node."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cluster.jobs import DEFAULT_PORT, Job, LaunchError, from_placement, from_skypilot, port_from, process_env
from cluster.launch import main
from cluster.postgres import free_port
from test_distribution import REPO, TOLERANCE, _env, _finish, _lab, _runs, _train
from test_train import CLS

jax_only = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
ray_only = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")

IPS = "10.0.0.1\n10.0.0.2\n10.0.0.3\n"  # as SkyPilot sets it: one a line, the head first


# ---- the variables -------------------------------------------------------------------------------------

def test_skypilot_nodes_give_each_process_its_index_and_the_heads_address():
    for rank in range(3):
        job = from_skypilot({"SKYPILOT_NODE_IPS": IPS, "SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NUM_NODES": "3"},
                            9000)
        assert job == Job("10.0.0.1:9000", 3, rank)
    assert job.env() == {"KERAS_BACKEND": "jax", "KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:9000",
                         "KERAS_DISTRIBUTION_NUM_PROCESSES": "3", "KERAS_DISTRIBUTION_PROCESS_ID": "2"}
    # SKYPILOT_NUM_NODES is optional; an IPv6 head is bracketed
    assert from_skypilot({"SKYPILOT_NODE_IPS": "fd00::1\nfd00::2", "SKYPILOT_NODE_RANK": "0"}, 80).coordinator \
        == "[fd00::1]:80"


@pytest.mark.parametrize("env, message", [
    ({"SKYPILOT_NODE_IPS": "\n", "SKYPILOT_NODE_RANK": "0"}, "SKYPILOT_NODE_IPS='\\n': no node IPs"),
    ({"SKYPILOT_NODE_IPS": IPS, "SKYPILOT_NODE_RANK": "3"},
     "SKYPILOT_NODE_RANK='3': expected a whole number from 0 to 2 (SKYPILOT_NODE_IPS lists 3 node(s))"),
    ({"SKYPILOT_NODE_IPS": IPS, "SKYPILOT_NODE_RANK": "-1"}, "SKYPILOT_NODE_RANK='-1': expected a whole number"),
    ({"SKYPILOT_NODE_IPS": IPS}, "SKYPILOT_NODE_RANK='': expected a whole number"),
    ({"SKYPILOT_NODE_IPS": IPS, "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NUM_NODES": "2"},
     "SKYPILOT_NUM_NODES='2' but SKYPILOT_NODE_IPS lists 3 node(s) (10.0.0.1, 10.0.0.2, 10.0.0.3)"),
])
def test_inconsistent_skypilot_variables_are_refused_naming_the_variable(env, message):
    with pytest.raises(LaunchError) as error:
        from_skypilot(env, DEFAULT_PORT)
    assert str(error.value).startswith(message)


def test_the_port_comes_from_the_option_then_the_variable_then_the_default():
    assert port_from(1234, {"IMAGEPIPE_COORDINATOR_PORT": "5678"}) == 1234
    assert port_from(None, {"IMAGEPIPE_COORDINATOR_PORT": "5678"}) == 5678
    assert port_from(None, {}) == DEFAULT_PORT == 8476
    with pytest.raises(LaunchError, match=r"^IMAGEPIPE_COORDINATOR_PORT='http': expected a port number"):
        port_from(None, {"IMAGEPIPE_COORDINATOR_PORT": "http"})
    with pytest.raises(LaunchError, match=r"^--port='70000': expected a port number from 1 to 65535"):
        port_from(70000, {})


def test_a_ray_placement_gives_process_i_bundle_i_and_bundle_0s_node_as_coordinator():
    ips = ["10.1.0.7", "10.1.0.3"]
    assert [from_placement(ips, i, 41000) for i in (0, 1)] == [Job("10.1.0.7:41000", 2, 0),
                                                               Job("10.1.0.7:41000", 2, 1)]
    with pytest.raises(LaunchError, match=r"^bundle index 2: expected 0 to 1 \(the placement group has 2"):
        from_placement(ips, 2, 41000)
    with pytest.raises(LaunchError, match=r"^placement node IPs \['10.1.0.7', ''\]: bundle 1 has no node IP"):
        from_placement(["10.1.0.7", ""], 0, 41000)
    with pytest.raises(LaunchError, match=r"^placement node IPs \[\]: no bundles"):
        from_placement([], 0, 41000)


def test_a_backend_other_than_jax_is_refused():
    job = Job("10.0.0.1:1", 2, 1)
    assert process_env({"PATH": "/bin"}, job) == {"PATH": "/bin", **job.env()}
    with pytest.raises(LaunchError, match=r"^KERAS_BACKEND='tensorflow': a training over several hosts runs on "
                                          "JAX only"):
        process_env({"KERAS_BACKEND": "tensorflow"}, job)


# ---- the command line, refusing ------------------------------------------------------------------------

@pytest.mark.parametrize("env, argv, message", [
    ({}, ["--", "true"], "SKYPILOT_NODE_RANK and SKYPILOT_NODE_IPS are not set: run this in a SkyPilot task"),
    ({"SKYPILOT_NODE_IPS": "10.0.0.1", "SKYPILOT_NODE_RANK": "1"}, ["--", "true"], "SKYPILOT_NODE_RANK='1'"),
    ({"SKYPILOT_NODE_IPS": "10.0.0.1", "SKYPILOT_NODE_RANK": "0"}, ["--", "no-such-program-here"],
     "command 'no-such-program-here': No such file or directory"),
    ({"KERAS_BACKEND": "torch"}, ["--ray", "--nodes", "2", "--", "true"], "KERAS_BACKEND='torch'"),
    ({}, ["--ray", "--nodes", "2", "--env", "KERAS_BACKEND=tensorflow", "--", "true"],
     "KERAS_BACKEND='tensorflow'"),
    ({}, ["--ray", "--nodes", "2", "--env", "IMAGEPIPE_NOT_SET_ANYWHERE", "--", "true"],
     "--env IMAGEPIPE_NOT_SET_ANYWHERE: not set here; give NAME=VALUE"),
])
def test_the_launcher_refuses_bad_input_with_exit_1_before_anything_starts(monkeypatch, caplog, env, argv, message):
    for name in ("SKYPILOT_NODE_IPS", "SKYPILOT_NODE_RANK", "SKYPILOT_NUM_NODES", "KERAS_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.ERROR, logger="cluster.launch"):
        assert main(argv) == 1
    assert message in caplog.text


@pytest.mark.parametrize("argv, message", [([], "no command: give it after '--'"),
                                           (["--ray", "--", "true"], "--ray needs --nodes N, 1 or more (got None)"),
                                           (["--ray", "--nodes", "2", "--cpus", "0", "--", "true"],
                                            "--cpus 0 --gpus 0: each process needs some CPUs or GPUs")])
def test_a_launch_without_a_command_or_node_count_is_a_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_training_on_one_device_is_refused_in_one_of_several_processes(tmp_path):
    """Launched without ``distribution: data_parallel``, each process would
    train and write the whole model alone: the stage stops first."""
    root = _lab(tmp_path / "lab", {"solo": {**CLS, "training": {**CLS["training"], "epochs": 1}}})
    result = _train(root, "solo", "jax", KERAS_DISTRIBUTION_NUM_PROCESSES="2")
    assert result.returncode == 1
    assert ("experiments.solo.training.distribution: none, but this process is one of 2 "
            "(KERAS_DISTRIBUTION_NUM_PROCESSES=2)") in result.stderr
    assert not (root / "models").exists()


# ---- two processes, for real ---------------------------------------------------------------------------

# no dropout, 600 training images at batch 16, as tests/test_distribution.py: one device's losses within 1e-4
CLASSIFIER = {**CLS, "model": {**CLS["model"], "dropout": 0.0},
              "training": {**CLS["training"], "epochs": 3, "batch_size": 16}}
EXPERIMENTS = {"one": CLASSIFIER, "two": {**CLASSIFIER, "training": {**CLASSIFIER["training"],
                                                                     "distribution": "data_parallel"}}}


@pytest.fixture(scope="module")
def one_device(tmp_path_factory) -> dict:
    """The history of the classifier trained in one process on one device."""
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    root = _lab(tmp_path_factory.mktemp("one-device") / "lab", EXPERIMENTS)
    result = _train(root, "one", "jax", IMAGEPIPE_CPU_DEVICES="")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((root / "models/one/history.json").read_text())


def _assert_one_model_like_one_device(root: Path, one: dict) -> None:
    two = json.loads((root / "models/two/history.json").read_text())
    assert set(two) == set(one) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=TOLERANCE, err_msg=key)
    assert one["loss"][-1] < one["loss"][0]  # it trained
    (run,) = _runs(root)
    assert run.info.run_name == "two" and run.info.status == "FINISHED"
    assert run.data.params["processes"] == "2" and run.data.params["replicas"] == "2"


@jax_only
def test_two_skypilot_nodes_train_one_model_with_the_losses_of_one_device(tmp_path, one_device):
    """Each 'node' (its own copy of the project, as after dvc pull on each
    host) runs the launcher with SkyPilot's variables; the launcher becomes
    the training, as process SKYPILOT_NODE_RANK of two."""
    root = _lab(tmp_path / "lab", EXPERIMENTS)
    other = tmp_path / "other-host"
    shutil.copytree(root, other)
    port = free_port()
    processes = []
    for rank, folder in enumerate((root, other)):
        env = _env(folder, "jax", SKYPILOT_NODE_RANK=str(rank), SKYPILOT_NODE_IPS="127.0.0.1\n127.0.0.1\n",
                   SKYPILOT_NUM_NODES="2", IMAGEPIPE_COORDINATOR_PORT=str(port))
        del env["IMAGEPIPE_CPU_DEVICES"], env["KERAS_BACKEND"]  # one CPU device each; the launcher sets jax
        log = open(folder / "launch.log", "w+")  # files, not pipes: neither process waits on the other's
        processes.append((subprocess.Popen(
            [sys.executable, "-m", "cluster.launch", "--", sys.executable, "-m", "stages.train", "two"],
            cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    results = _finish(processes)
    for code, text in results:
        assert code == 0, text[-3000:]
    chief_log, worker_log = (text for _, text in results)
    assert f"process 0 of 2, process 0 at 127.0.0.1:{port}: {sys.executable} -m stages.train two" in chief_log
    assert f"process 1 of 2, process 0 at 127.0.0.1:{port}" in worker_log
    assert "over 2 cpu device(s) in 2 process(es), this one 0" in chief_log
    assert "over 2 cpu device(s) in 2 process(es), this one 1" in worker_log
    assert "process 1 of 2 done" in worker_log
    _assert_one_model_like_one_device(root, one_device)
    assert not (other / "models").exists() and not (other / "mlflow.db").exists()


@pytest.fixture
def two_ray_nodes():
    """A Ray cluster of two nodes (two raylets) on this machine, one CPU each."""
    from ray.cluster_utils import Cluster

    cluster = Cluster()
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, include_dashboard=False)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()


def _launch(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "cluster.launch", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


@jax_only
@ray_only
def test_two_processes_on_two_ray_nodes_train_one_model_with_the_losses_of_one_device(tmp_path, one_device,
                                                                                      two_ray_nodes):
    """One bundle on each node (STRICT_SPREAD), both processes in one shared
    project folder: one model, one MLflow run, one device's losses."""
    root = _lab(tmp_path / "lab", EXPERIMENTS)
    env = _env(root, "jax")
    result = _launch(["--ray", "--address", two_ray_nodes, "--nodes", "2",
                      "--env", f"MLFLOW_TRACKING_URI={env['MLFLOW_TRACKING_URI']}", "--env", f"PYTHONPATH={REPO}",
                      "--env", "TF_CPP_MIN_LOG_LEVEL=3", "--", sys.executable, "-m", "stages.train", "two"], root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching 2 process(es) on " in result.stderr and f"in {root}" in result.stderr
    assert "all 2 process(es) done" in result.stderr
    _assert_one_model_like_one_device(root, one_device)


SHOW_AND_FAIL = """
import json, os, sys, time
index = os.environ["KERAS_DISTRIBUTION_PROCESS_ID"]
names = ("KERAS_BACKEND", "KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES", "GREETING")
shown = {name: os.environ.get(name) for name in names}
json.dump({**shown, "pid": os.getpid(), "cwd": os.getcwd()}, open(f"process-{index}.json", "w"))
print("process", index, "fails now" if index == "1" else "waits", flush=True)
if index == "1":
    sys.exit(3)
time.sleep(300)
"""


@ray_only
def test_a_failing_process_fails_the_launch_naming_it_and_the_others_are_stopped(tmp_path):
    """On one machine (--pack): each process gets its index, the count and
    process 0's address; process 1 exits 3, process 0 would wait at its next
    collective: it is stopped after --grace, and the launch exits 1 naming
    process 1, its node and its last lines."""
    started = time.monotonic()
    result = _launch(["--ray", "--address", "local", "--nodes", "2", "--pack", "--grace", "2", "--env", "GREETING=hi",
                      "--", sys.executable, "-c", SHOW_AND_FAIL], tmp_path)
    seconds = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-3000:]
    shown = [json.loads((tmp_path / f"process-{i}.json").read_text()) for i in (0, 1)]
    address = shown[0]["KERAS_DISTRIBUTION_JOB_ADDRESSES"]
    node, port = address.rsplit(":", 1)
    assert port.isdigit() and f"process 0 at {address}, in {tmp_path}" in result.stderr
    for process in shown:
        assert process["KERAS_BACKEND"] == "jax" and process["KERAS_DISTRIBUTION_NUM_PROCESSES"] == "2"
        assert process["KERAS_DISTRIBUTION_JOB_ADDRESSES"] == address and process["GREETING"] == "hi"
        assert process["cwd"] == str(tmp_path)
    assert (f"process 1 on {node} failed (exit code 3 after" in result.stderr
            and f"process 0 on {node}: stopped by the launcher" in result.stderr)
    assert "its last lines:\n  process 1 fails now" in result.stderr
    with pytest.raises(ProcessLookupError):  # process 0's command was stopped with it
        os.kill(shown[0]["pid"], 0)
    assert seconds < 60, seconds


@ray_only
def test_processes_that_the_cluster_cannot_place_or_whose_folder_is_missing_are_refused(tmp_path):
    """One node cannot hold two bundles that must each have their own node;
    a --workdir that a node lacks is named with the process and node."""
    result = _launch(["--ray", "--address", "local", "--nodes", "2", "--wait", "2", "--", "true"], tmp_path)
    assert result.returncode == 1
    assert ("--nodes 2: the cluster could not place 2 bundle(s) of 1 CPU (STRICT_SPREAD: each on its own node) "
            "within 2 s; it has 1 node(s) alive (") in result.stderr
    assert "or --pack on one machine" in result.stderr
    missing = tmp_path / "not-here"
    result = _launch(["--ray", "--address", "local", "--nodes", "2", "--pack", "--workdir", str(missing), "--",
                      "true"], tmp_path)
    assert result.returncode == 1
    assert f"--workdir {missing}: no such folder for process 0 on " in result.stderr
    assert "every host needs the project at the same path" in result.stderr


WAIT = """
import os, time
open(f"pid-{os.environ['KERAS_DISTRIBUTION_PROCESS_ID']}", "w").write(str(os.getpid()))
time.sleep(300)
"""


@ray_only
def test_a_launcher_stopped_with_sigterm_stops_its_processes_too(tmp_path):
    """SIGTERM to the launcher (a scheduler cancelling it) stops every
    process's command, not leaving them to train on: also where SIGINT is
    ignored, as for a launcher started in the background by a shell (Ray's
    cancel is a simulated SIGINT)."""
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(REPO)}
    launch = [sys.executable, "-m", "cluster.launch", "--ray", "--address", "local", "--nodes", "2", "--pack", "--",
              sys.executable, "-c", WAIT]
    launcher = subprocess.Popen(["sh", "-c", 'trap "" INT; exec "$@"', "sh", *launch], cwd=tmp_path, env=env,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"pid-{i}").exists() for i in (0, 1)) and time.monotonic() < deadline:
            assert launcher.poll() is None, launcher.stderr.read()[-3000:]
            time.sleep(0.2)
        time.sleep(0.5)  # both pid files written
        pids = [int((tmp_path / f"pid-{i}").read_text()) for i in (0, 1)]
        launcher.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        code = launcher.wait(timeout=60)
        stopped_s = time.monotonic() - stopping
    finally:
        launcher.kill()
    stderr = launcher.stderr.read()
    assert code == 130, stderr[-3000:]
    assert "interrupted: stopping the 2 process(es)" in stderr
    assert stopped_s < 30, stopped_s  # without SIGINT, Ray's cancel is lost and the launcher waits 40 s (STOP_S)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
