"""Sweeps on a real Ray cluster (``python -m cluster.sweep``): a head and two
one-CPU worker nodes on this machine, each its own ``ray start`` process, a
bare git repository every node clones, a local DVC remote folder and a real
mlflow server as the team's tracking server. Tiny data, few epochs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

import builders
from cluster import sweep, sweep_task
from dvc_helpers import dvc_env, git_commit, make_project, pets_params, run_dvc
from mlflow_server import MlflowServer, metrics, params, tags
from ray_cluster import RayCluster
from test_pipeline import PETS_CNN

pytestmark = pytest.mark.heavy  # real pipelines, servers or clusters: scheduled first (conftest.py)

EPOCHS_TO_KILL = 40  # the killed experiment's epochs: enough that the kill lands mid-training


def _cnn(**training) -> dict:
    return {**PETS_CNN, "training": {**PETS_CNN["training"], **training}}


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """The submitter's clone of a project whose data is on the DVC remote, the
    cluster and the tracking server."""
    root = tmp_path_factory.mktemp("team")
    images = builders.image_folder(root / "pets", classes=("cat", "dog"), per_class=12, size=(16, 16), mode="L")
    assert images
    archive = builders.tar_gz(root / "pets", root / "pets.tar.gz")
    source = {"path": str(archive), "sha256": builders.sha256(archive.read_bytes())}
    experiments = {"sweep_cnn": _cnn(), "fail_cnn": _cnn(),
                   "kill_cnn": _cnn(epochs=EPOCHS_TO_KILL, checkpoint_interval_s=0)}
    project = make_project(root / "project", pets_params(source, experiments))
    run_dvc(project, "remote", "add", "-d", "store", str(root / "dvc-remote"))
    run_dvc(project, "repro", "prepare@pets")  # the data, made once and pushed: every experiment pulls it
    run_dvc(project, "push")
    git_commit(project, "the project and its data")
    subprocess.run(["git", "clone", "-q", "--bare", str(project), str(root / "origin.git")], check=True)
    submitter = root / "submitter"
    subprocess.run(["git", "clone", "-q", str(root / "origin.git"), str(submitter)], check=True)
    server = MlflowServer(root / "mlflow").start()
    cluster = RayCluster(workers=2, env=dvc_env(server.url)).start()
    try:
        yield {"root": root, "submitter": submitter, "server": server, "cluster": cluster}
    finally:
        cluster.stop()
        server.stop()


def _sweep(team, log: Path, *args: str, wait: bool = True):
    """``python -m cluster.sweep`` in the submitter's clone, on the test cluster, its output in ``log``."""
    command = [sys.executable, "-m", "cluster.sweep", "--address", team["cluster"].address,
               "--checkpoints", str(team["root"] / "shared-checkpoints"), *args]
    with open(log, "w") as out:  # a file, not a pipe: Ray's messages about a dead node could fill one
        process = subprocess.Popen(command, cwd=team["submitter"], env=team["cluster"].env, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if not wait:
        return process
    process.wait(timeout=600)
    return process.returncode, log.read_text()


def _exp_show(team) -> dict[str, dict]:
    """{experiment name: its params.yaml and metrics files} as the submitter's dvc exp show has them."""
    shown = json.loads(run_dvc(team["submitter"], "exp", "show", "--json", env=team["cluster"].env).stdout)
    found = {}
    for rev in shown:
        for exp in rev.get("experiments") or []:
            data = exp["revs"][0]["data"]
            found[exp["name"]] = {"rev": exp["revs"][0]["rev"], "params": data["params"]["params.yaml"]["data"],
                                  "metrics": {path: m["data"] for path, m in data["metrics"].items() if "data" in m}}
    return found


def _runs_of(team, dvc_exp_name: str) -> list[dict]:
    server = team["server"]
    return [run for name in server.experiments() if name in ("classifiers",) for run in server.runs(name)
            if tags(run).get("dvc_exp_name") == dvc_exp_name]


def test_two_experiments_run_on_two_nodes_and_come_back_to_the_submitter(team, tmp_path):
    team["cluster"].ensure_workers()
    summary = tmp_path / "summary.json"
    code, out = _sweep(team, tmp_path / "sweep.log", "-n", "bs", "-S", "experiments.sweep_cnn.training.batch_size=2,4",
                       "--summary", str(summary))
    assert code == 0, out
    results = {r["name"]: r for r in json.loads(summary.read_text())}
    assert {name: r["status"] for name, r in results.items()} == {"bs-1": "done", "bs-2": "done"}, out
    nodes = {node_id: name for name, node_id in team["cluster"].node_ids().items()}
    assert {nodes[r["node"]] for r in results.values()} == {"node1", "node2"}, (results, nodes)
    assert "dvc exp show" in out and "bs-1" in out and "bs-2" in out

    shown = _exp_show(team)
    for name, batch in (("bs-1", 2), ("bs-2", 4)):
        assert shown[name]["params"]["experiments"]["sweep_cnn"]["training"]["batch_size"] == batch
        assert 0 <= shown[name]["metrics"]["metrics/sweep_cnn.json"]["test"]["accuracy"] <= 1
        [run] = _runs_of(team, name)
        assert run["info"]["status"] == "FINISHED" and params(run)["training.batch_size"] == str(batch)
        assert "test_accuracy" in metrics(run)  # evaluate logged into the same run
    # the outputs came too: the run.json of bs-2's dvc.lock is in the submitter's DVC cache
    lock = yaml.safe_load(subprocess.run(["git", "show", f"{shown['bs-2']['rev']}:dvc.lock"], cwd=team["submitter"],
                                         capture_output=True, text=True, check=True).stdout)
    [md5] = [out["md5"] for out in lock["stages"]["train@sweep_cnn"]["outs"]
             if out["path"] == "models/sweep_cnn/run.json"]
    ref = json.loads((team["submitter"] / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).read_text())
    assert ref["run_id"] == _runs_of(team, "bs-2")[0]["info"]["run_id"]


def test_a_failing_experiment_fails_its_task_with_its_one_line_error_and_the_other_completes(team, tmp_path):
    team["cluster"].ensure_workers()
    summary = tmp_path / "summary.json"
    code, out = _sweep(team, tmp_path / "sweep.log", "-n", "bad", "-S",
                       "experiments.fail_cnn.training.batch_size=4,0", "--summary", str(summary))
    assert code == 1, out
    results = {r["name"]: r for r in json.loads(summary.read_text())}
    assert results["bad-1"]["status"] == "done", out
    failed = results["bad-2"]
    assert failed["status"] == "failed" and "\n" not in failed["error"], failed
    # the training stage's own line: what is wrong, naming the key
    assert failed["error"].startswith("dvc exp run: train failed: ") and "fail_cnn.training.batch_size" in \
        failed["error"], failed["error"]
    assert f"bad-2 failed on node {failed['node'][:12]}: {failed['error']}" in out
    assert "1 of 2 experiments failed: bad-2" in out
    assert set(_exp_show(team)) >= {"bad-1"} and "bad-2" not in _exp_show(team)
    [run] = _runs_of(team, "bad-1")
    assert run["info"]["status"] == "FINISHED"
    assert _runs_of(team, "bad-2") == []  # refused before a run was started


def _wait_for_checkpoint(folder: Path, process: subprocess.Popen, epoch: int, timeout: float = 300) -> dict:
    """The shared checkpoint's state once it holds ``epoch`` epochs; the sweep must still run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in folder.glob("kill_cnn-*/state.json"):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if state["epoch"] >= epoch:
                return state
        assert process.poll() is None, "the sweep ended before the training checkpointed"
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of {epoch} epochs in {folder} in {timeout} s")


def test_a_node_killed_mid_training_is_retried_on_the_other_and_resumes_in_the_same_mlflow_run(team, tmp_path):
    cluster = team["cluster"]
    cluster.ensure_workers()
    summary, log = tmp_path / "summary.json", tmp_path / "sweep.log"
    process = _sweep(team, log, "-n", "kill", "-S", f"experiments.kill_cnn.training.epochs={EPOCHS_TO_KILL}",
                     "--summary", str(summary), wait=False)
    try:
        state = _wait_for_checkpoint(team["root"] / "shared-checkpoints", process, epoch=2)
        killed = cluster.node_running("stages.train kill_cnn")
        assert killed in ("node1", "node2"), killed
        killed_id = cluster.node_ids()[killed]
        cluster.kill_node(killed)  # the raylet, its workers, dvc and the training: as a machine that dies
        process.wait(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    out = log.read_text()
    assert process.returncode == 0, out
    [result] = json.loads(summary.read_text())
    assert result["status"] == "done" and result["node"] not in (killed_id, "") and \
        result["node"] == cluster.node_ids()["node2" if killed == "node1" else "node1"], (result, killed)

    trained = _exp_show(team)["kill-1"]["metrics"]["metrics/kill_cnn.json"]["trained"]
    assert state["epoch"] <= trained["resumed_at_epoch"] < EPOCHS_TO_KILL, (state, trained)  # from the checkpoint
    [run] = _runs_of(team, "kill-1")  # one run, continued: nothing doubled
    assert run["info"]["run_id"] == state["run_id"] and run["info"]["status"] == "FINISHED"
    assert team["server"].metric_steps(state["run_id"], "loss") == list(range(1, EPOCHS_TO_KILL + 1))
    assert team["server"].metric_steps(state["run_id"], "val_loss") == list(range(1, EPOCHS_TO_KILL + 1))


def test_without_an_address_the_sweep_runs_on_this_machine_and_logs_to_the_project_store(team, tmp_path):
    """No --address and no cluster to find: Ray starts one here (the same path as a bare ray.init()); with
    MLFLOW_TRACKING_URI unset the experiment logs to the submitter's mlflow.db."""
    from mlflow.tracking import MlflowClient

    env = {key: value for key, value in team["cluster"].env.items() if key != "MLFLOW_TRACKING_URI"}
    ray_tmp = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))  # short: Ray's socket paths have a limit
    env.update(RAY_ADDRESS="local", RAY_TMPDIR=str(ray_tmp))  # never the test cluster, nor one found in /tmp/ray
    try:
        result = subprocess.run([sys.executable, "-m", "cluster.sweep", "-n", "here", "-S",
                                 "experiments.sweep_cnn.training.batch_size=3"], cwd=team["submitter"], env=env,
                                capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"the experiments log to sqlite:///{team['submitter'] / 'mlflow.db'}" in result.stderr
    assert "'node1'" not in result.stderr  # not the test cluster's resources
    assert "here-1" in _exp_show(team)
    client = MlflowClient(f"sqlite:///{team['submitter'] / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("classifiers").experiment_id],
                               filter_string="tags.dvc_exp_name = 'here-1'")
    assert run.info.status == "FINISHED" and run.data.params["training.batch_size"] == "3"


def test_a_key_the_params_do_not_have_is_refused_before_anything_runs(team, tmp_path):
    code, out = _sweep(team, tmp_path / "sweep.log", "-S", "experiments.sweep_cnn.training.batchsize=2,4")
    assert code == 1
    assert "-S experiments.sweep_cnn.training.batchsize=2,4: params.yaml has no key " \
           "'experiments.sweep_cnn.training.batchsize'" in out, out
    assert "submitted" not in out


def test_the_grid_is_the_product_of_dvc_sweep_values():
    assert sweep.grid(["a.b=1,2", "c=range(10,30,10)"]) == [
        ["a.b=1", "c=10"], ["a.b=1", "c=20"], ["a.b=2", "c=10"], ["a.b=2", "c=20"]]
    assert sweep.grid(["x=choice(small,large)"]) == [["x=small"], ["x=large"]]
    assert sweep.grid(["a.b=[1,2]"]) == [["a.b=[1,2]"]]  # a list value, not a sweep
    assert sweep.grid(["other.yaml:k=3,4"]) == [["other.yaml:k=3"], ["other.yaml:k=4"]]
    assert sweep.default_targets(sweep.grid(["experiments.m.training.epochs=1,2", "experiments.n.seed=0"])) == \
        ["evaluate@m", "evaluate@n"]
    assert sweep.default_targets([["limits.max_epochs=1"]]) == []  # the whole pipeline
    for bad, says in (("a.b=1,", "-S a.b=1,: "), ("a.b", "-S 'a.b': expected KEY=VALUE"),
                      ("a=range(1,x)", "-S a=range(1,x): "), ("a=glob(*)", "Glob override 'a=glob(*)' is not")):
        with pytest.raises(sweep.SweepError) as raised:
            sweep.grid([bad])
        assert says in str(raised.value) and "\n" not in str(raised.value), str(raised.value)


def test_the_one_line_error_is_the_stage_s_own():
    output = ("Running stage 'train@x':\n> python -m stages.train x\n"
              "12:00:01 ERROR stages: train failed: experiments.x.training.batch_size: must be > 0\n"
              "12:00:01 ERROR stages: train: what to do: fix params.yaml\n"
              "ERROR: failed to reproduce 'train@x': failed to run: python -m stages.train x, exited with 1\n")
    assert sweep_task.one_line_error(output) == "train failed: experiments.x.training.batch_size: must be > 0"
    assert sweep_task.one_line_error("Traceback (most recent call last):\n  File x\nValueError: odd\nERROR: failed to "
                                "reproduce 'train@x'\n") == "ValueError: odd"
    assert sweep_task.one_line_error("ERROR: unexpected error - no remote\n") == "unexpected error - no remote"
    assert sweep_task.one_line_error("fatal: reference is not a tree: abc\n") == "fatal: reference is not a tree: abc"


def test_a_step_does_not_outlive_the_worker_that_runs_it(tmp_path):
    """A Ray worker killed on its own (its node lives on) takes its step's
    processes along, so the retry never trains beside an orphaned training."""
    import os
    import signal

    import psutil

    pid_file = tmp_path / "sleeper.pid"
    step = (f"import os; from pathlib import Path; from cluster.sweep_task import _step; "
            f"_step('sleep', ['sh', '-c', 'sleep 300 & echo $! > {pid_file}; wait'], Path('.'), dict(os.environ), "
            f"Path({str(tmp_path / 'out.log')!r}), 'node')")
    worker = subprocess.Popen([sys.executable, "-c", step])
    deadline = time.monotonic() + 60
    while not pid_file.is_file() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline and worker.poll() is None
        time.sleep(0.05)
    sleeper = psutil.Process(int(pid_file.read_text()))
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    deadline = time.monotonic() + 10
    while sleeper.is_running() and sleeper.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the step's process outlived its worker"
        time.sleep(0.05)


def test_the_default_dvc_remote_is_found_whatever_the_length_of_its_path(tmp_path):
    """A remote path longer than a line of 80 columns (pytest's and xdist's
    temporary folders make them so): ``dvc remote list`` would wrap its
    ``(default)`` onto a line of its own when its output is a pipe."""
    project = tmp_path / "p"
    project.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    run_dvc(project, "init", "-q")
    far = tmp_path / ("a-long-folder-name-" * 5) / "dvc-remote"
    run_dvc(project, "remote", "add", "store", str(tmp_path / "other"))
    run_dvc(project, "remote", "add", "-d", "far", str(far))
    assert sweep.dvc_remote(project, None) == ("far", str(far))
    assert sweep.dvc_remote(project, "store") == ("store", str(tmp_path / "other"))
    with pytest.raises(sweep.SweepError, match="--dvc-remote nope: no such DVC remote .the project has: "):
        sweep.dvc_remote(project, "nope")
