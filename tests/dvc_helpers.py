"""Real DVC projects for the pipeline, fault and tracking-server tests.

A project is a git + DVC repository holding a copy of ``stages/`` and
``dvc.yaml`` with a params.yaml of tiny datasets and experiments; commands run
through the real ``dvc`` of this environment.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DVC = shutil.which("dvc", path=os.path.dirname(sys.executable)) or shutil.which("dvc")


def dvc_env(tracking_uri: str | None = None) -> dict[str, str]:
    """The environment of a stage: this venv first on PATH, no mirror, and the
    project's own MLflow store (sqlite:///mlflow.db in the project) unless
    ``tracking_uri`` names another."""
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    env.pop("DATA_MIRROR", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def run_dvc(cwd: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``dvc args`` in ``cwd`` and capture its output through files: ``dvc queue
    start`` leaves daemon workers behind that would hold pipes open."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run([DVC, *args], cwd=cwd, env=env or dvc_env(), stdout=out, stderr=err,
                              stdin=subprocess.DEVNULL).returncode
        out.seek(0), err.seek(0)
        result = subprocess.CompletedProcess([DVC, *args], code, out.read(), err.read())
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def ran(output: str) -> set[str]:
    """The stages a ``dvc repro`` / ``dvc exp run`` ran, from its output."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def pets_params(source: dict, experiments: dict, corruptions: dict | None = None, **dataset) -> dict:
    """A project's params for the tiny pets image folder: a deep copy of what it is given, so that a test
    changing its params (``params["experiments"]["pets_cnn"]["training"]["batch_size"] = 2``) cannot change
    a shared constant such as test_pipeline's ``PETS_CNN`` for the tests after it on the same worker."""
    source, experiments, corruptions, dataset = copy.deepcopy((source, experiments, corruptions, dataset))
    return {
        "limits": {"max_samples": None, "max_epochs": None},
        "download": {"retries": 0, "cache_dir": "data/cache"},
        "datasets": {"pets": {"source": source, "split": {"val_fraction": 0.25, "seed": 0}, **dataset}},
        "corruptions": corruptions or {},
        "experiments": experiments,
        "promotion": {"psnr_db": 0.5, "accuracy": 0.02},  # DVC needs the section the evaluate stage depends on
    }


def make_project(root: Path, params: dict) -> Path:
    root.mkdir(parents=True)
    shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    run_dvc(root, "init", "-q")
    return root


def git_commit(root: Path, message: str) -> None:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", message], cwd=root, check=True)


def wait_for_queue(root: Path, env: dict | None = None, timeout: float = 600) -> str:
    """Poll ``dvc queue status`` until nothing is queued or running; return the last table.

    A status call that fails is tried again: DVC can read a worker's info
    file while the worker is writing it ("Expecting value: line 1 column 1").
    """
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        result = run_dvc(root, "queue", "status", env=env, check=False)
        if result.returncode == 0:
            status = result.stdout
            if not any(word in status for word in ("Queued", "Running")):
                return status
        time.sleep(2)
    raise AssertionError(f"queue did not finish in {timeout} s:\n{status}")
