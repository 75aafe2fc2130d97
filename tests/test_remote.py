"""Results that travel: a real DVC remote (a local folder) between real
clones of a project. One clone trains and pushes; another pulls, finds
nothing to do and evaluates the pulled model to the same metrics; a third,
with no ``dvc.lock``, restores every stage from the pushed run-cache; an
experiment run in the second goes to the third with ``dvc exp push`` /
``dvc exp pull``."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import builders
from dvc_helpers import dvc_env, git_commit, make_project, pets_params, ran, run_dvc

pytestmark = pytest.mark.heavy  # real pipelines, servers or clusters: scheduled first (conftest.py)

CNN = {"task": "classifier", "data": {"input": "prepared/pets", "target": "prepared/pets"},
       "model": {"kind": "cnn", "conv": [{"filters": 4}], "dense": [8]},
       "training": {"loss": "sparse_categorical_crossentropy", "epochs": 1, "batch_size": 4,
                    "metrics": ["accuracy"]}}


def _clone(origin: Path, dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(origin), str(dest)], check=True)
    return dest


def test_a_pushed_run_is_pulled_by_a_clone_that_then_has_nothing_to_do(tmp_path):
    folder = tmp_path / "pets"
    builders.image_folder(folder, classes=("cat", "dog"), per_class=4, mode="L")
    archive = builders.tar_gz(folder, tmp_path / "pets.tar.gz")
    source = {"path": str(archive), "sha256": builders.sha256(archive.read_bytes())}
    project = make_project(tmp_path / "team/project", pets_params(source, {"pets_cnn": CNN}))
    remote, store = tmp_path / "team/dvc-remote", f"sqlite:///{tmp_path / 'team/mlflow.db'}"
    env = dvc_env(store)  # one MLflow store for every clone, as a team server would be
    run_dvc(project, "remote", "add", "-d", "local", str(remote))
    first = run_dvc(project, "repro", env=env)
    assert "train@pets_cnn" in ran(first.stdout)
    run_dvc(project, "push", "--run-cache", env=env)
    git_commit(project, "a trained run")
    bare = tmp_path / "team/origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(project), str(bare)], check=True)
    metrics = json.loads((project / "metrics/pets_cnn.json").read_text())

    colleague = _clone(bare, tmp_path / "colleague")
    run_dvc(colleague, "pull", env=env)
    assert "up to date" in run_dvc(colleague, "status", env=env).stdout
    assert run_dvc(colleague, "metrics", "diff", env=env).stdout.strip() == ""
    assert ran(run_dvc(colleague, "repro", env=env).stdout) == set()
    import keras

    model = keras.models.load_model(colleague / "models/pets_cnn/model.keras")
    assert model.output.shape[1:] == (2,)
    # evaluate again on the pulled model and data: the same metrics
    again = subprocess.run([sys.executable, "-m", "stages.evaluate", "pets_cnn", "--metrics", str(tmp_path / "again.json"),
                            "--reports", str(tmp_path / "again_reports"), "--plots", str(tmp_path / "again_plots")],
                           cwd=colleague, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "again.json").read_text())["test"] == metrics["test"]

    cached = _clone(bare, tmp_path / "ci")
    # the run-cache alone: a clone whose dvc.lock names no run restores every stage's outputs from it
    (cached / "dvc.lock").unlink()
    restored = run_dvc(cached, "repro", "--pull", env=env).stdout
    # the data stages and the training come from the run-cache; evaluate and report, whose metrics, plots and
    # summary are kept in git, are not in it (DVC 3.67), so those two stages run, in seconds
    assert ran(restored) == {"evaluate@pets_cnn", "report"}, restored
    for stage in ("download@pets", "prepare@pets", "train@pets_cnn"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in restored, restored
    assert json.loads((cached / "metrics/pets_cnn.json").read_text()) == metrics
    assert (cached / "models/pets_cnn/model.keras").read_bytes() == \
        (project / "models/pets_cnn/model.keras").read_bytes()
    assert "up to date" in run_dvc(cached, "status", env=env).stdout
    subprocess.run(["git", "checkout", "-q", "dvc.lock", "reports/summary.md"], cwd=cached, check=True)
    # an experiment run in one clone, pushed, and pulled into another
    run_dvc(colleague, "exp", "run", "-n", "two-epochs", "-S", "experiments.pets_cnn.training.epochs=2", env=env)
    run_dvc(colleague, "exp", "push", "origin", "two-epochs", env=env)
    run_dvc(cached, "exp", "pull", "origin", "two-epochs", env=env)
    shown = json.loads(run_dvc(cached, "exp", "show", "--json", env=env).stdout)
    names = {exp.get("name") for rev in shown for exp in (rev.get("experiments") or [])}
    assert "two-epochs" in names, shown
    run_dvc(cached, "exp", "apply", "two-epochs", env=env)
    assert json.loads((cached / "metrics/pets_cnn.json").read_text())["epochs"] == 2
