"""Sweeps with DVC's own queue: a grid queued with ``dvc exp run --queue -S``
(a list of values times ``range(...)``, in one call), run by ``dvc queue start``'s
one worker, then compared by ``dvc exp show`` and ``python -m cluster.compare``,
on the tiny pets image folder of test_pipeline.py."""

import csv
import io
import json
import subprocess
import sys

import pytest
import yaml

import builders
from dvc_helpers import REPO, dvc_env, git_commit, make_project, pets_params, run_dvc, wait_for_queue
from test_pipeline import PETS_CNN

pytestmark = pytest.mark.heavy  # real pipelines, servers or clusters: scheduled first (conftest.py)

TRAINING = "experiments.pets_cnn.training"


@pytest.fixture
def project(tmp_path):
    folder = tmp_path / "pets"
    builders.image_folder(folder, classes=("cat", "dog"), per_class=4, mode="L")
    archive = builders.tar_gz(folder, tmp_path / "pets.tar.gz")
    source = {"path": str(archive), "sha256": builders.sha256(archive.read_bytes())}
    root = make_project(tmp_path / "proj", pets_params(source, {"pets_cnn": PETS_CNN}))
    run_dvc(root, "repro")
    git_commit(root, "baseline")  # batch_size 4, 1 epoch
    return root


def _experiments(root) -> dict[str, dict]:
    """name -> {state, training params, the metrics file} from dvc exp show --json."""
    shown = json.loads(run_dvc(root, "exp", "show", "--json").stdout)
    found = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            data = exp["revs"][0]["data"]
            found[exp["name"]] = {
                "state": (exp.get("executor") or {}).get("state"),
                "training": data["params"]["params.yaml"]["data"]["experiments"]["pets_cnn"]["training"],
                "metrics": data["metrics"].get("metrics/pets_cnn.json", {}).get("data")}
    return found


def test_grids_expand_run_in_the_queue_and_compare_side_by_side(project):
    baseline = (project / "params.yaml").read_text()
    training = yaml.safe_load(baseline)["experiments"]["pets_cnn"]["training"]
    assert (training["batch_size"], training["epochs"]) == (4, 1), training  # the grid below is built around it
    grid = run_dvc(project, "exp", "run", "--queue", "-n", "g", "-S", f"{TRAINING}.batch_size=4,2",
                   "-S", f"{TRAINING}.epochs=range(1,3)")
    assert "Queued experiment 'g-4'" in grid.stdout, grid.stdout
    workspace = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True).stdout
    assert (project / "params.yaml").read_text() == baseline and not workspace, workspace  # queueing left it alone

    queued = _experiments(project)
    # one experiment per combination, the last axis fastest; range's stop is left out, as in Python
    assert {name: (e["state"], e["training"]["batch_size"], e["training"]["epochs"]) for name, e in queued.items()} \
        == {"g-1": ("queued", 4, 1), "g-2": ("queued", 4, 2), "g-3": ("queued", 2, 1), "g-4": ("queued", 2, 2)}

    # two cores: run three of them (two trainings, as g-1 has the baseline's params), not all four
    run_dvc(project, "queue", "remove", "g-4")
    assert "g-4" not in _experiments(project)
    run_dvc(project, "queue", "start")
    try:
        status = wait_for_queue(project)
    finally:
        run_dvc(project, "queue", "stop", check=False)
    assert status.count("Success") == 3, status

    done = _experiments(project)
    for name, exp in done.items():
        assert exp["state"] == "success", (name, exp)
        assert exp["metrics"]["epochs"] == exp["training"]["epochs"], name  # evaluate's, from this run's model
        assert 0.0 <= exp["metrics"]["test"]["accuracy"] <= 1.0 and exp["metrics"]["test"]["loss"] > 0, name

    changed = list(csv.DictReader(io.StringIO(run_dvc(project, "exp", "show", "--only-changed", "--csv").stdout)))
    assert {row["Experiment"] for row in changed} >= {"g-1", "g-2", "g-3"}
    assert {f"{TRAINING}.batch_size", f"{TRAINING}.epochs"} <= set(changed[0])
    assert f"{TRAINING}.loss" not in changed[0]  # the same everywhere: left out

    diff = json.loads(run_dvc(project, "plots", "diff", "g-3", "g-2", "--json").stdout)
    assert diff["data"]["plots/classifier/pets_cnn.json"][0]["revisions"] == ["g-3", "g-2"]

    compared = subprocess.run([sys.executable, "-m", "cluster.compare", "--repo", str(project)], cwd=REPO,
                              env=dvc_env(), capture_output=True, text=True, timeout=120)
    assert compared.returncode == 0, compared.stderr
    lines = [line for line in compared.stdout.splitlines() if line.startswith("| ")]
    assert lines[0] == "| experiment | training.epochs | training.batch_size | test.accuracy | test.loss |"
    rows = {line.split(" | ")[0].strip("| *").removesuffix("** (best)"): line for line in lines[1:]}
    assert {"g-1", "g-2", "g-3"} <= set(rows), compared.stdout
    test = {name: exp["metrics"]["test"] for name, exp in done.items()}
    best = max(test, key=lambda name: (test[name]["accuracy"], -test[name]["loss"]))
    assert rows[best].startswith(f"| **{best}** (best) | {done[best]['training']['epochs']} | "
                                 f"{done[best]['training']['batch_size']} | {test[best]['accuracy']:.4f}"), \
        compared.stdout
    ranked = [row.split(" | ")[0].strip("| *").removesuffix("** (best)") for row in lines[1:]]
    experiments_only = [name for name in ranked if name in test]
    assert experiments_only == sorted(test, key=lambda n: (-test[n]["accuracy"], test[n]["loss"], n)), compared.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    classifiers = client.get_experiment_by_name("classifiers")
    runs = client.search_runs([classifiers.experiment_id], "tags.dvc_exp_name LIKE 'g-%'")
    logged = {(r.data.tags["dvc_exp_name"], r.data.params["training.batch_size"], r.data.params["training.epochs"])
              for r in runs}
    assert logged == {("g-2", "4", "2"), ("g-3", "2", "1")}, _what_the_queue_did(project, client)
    # g-1 has the baseline's params: DVC found nothing to run, and its results are the baseline's


def _what_the_queue_did(root, client) -> str:
    """For a failure: every MLflow run with its tags, and each experiment's output from ``dvc queue logs``."""
    lines = []
    for exp in client.search_experiments():
        for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time"]):
            tags = {k: v for k, v in r.data.tags.items() if not k.startswith(("mlflow.", "data_md5", "machine"))}
            lines.append(f"run {exp.name} {r.info.run_name} {r.info.status} start={r.info.start_time} {tags} "
                         f"batch={r.data.params.get('training.batch_size')} "
                         f"epochs={r.data.params.get('training.epochs')}")
    for name in ("g-1", "g-2", "g-3"):
        logs = run_dvc(root, "queue", "logs", name, check=False)
        lines.append(f"--- dvc queue logs {name} (rc {logs.returncode}):\n{logs.stdout}{logs.stderr}")
    return "\n".join(lines)
