"""Fault injection with real processes and real signals: ``kill -9`` of a whole
``dvc repro`` (DVC, the stage it runs and the stage's workers) during download,
prepare, train, evaluate and report, then ``dvc repro`` again until it completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import builders
from dvc_helpers import DVC, dvc_env, make_project, pets_params, ran, run_dvc
from test_pipeline import PETS_CNN

pytestmark = pytest.mark.heavy  # real pipelines, servers or clusters: scheduled first (conftest.py)

EPOCHS = 4


class Repro:
    """``dvc repro`` in its own process group, its output collected line by line."""

    def __init__(self, project: Path):
        self.process = subprocess.Popen([DVC, "repro"], cwd=project, env=dvc_env(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def kill_when(self, condition, timeout: float = 300) -> None:
        """SIGKILL the whole process group as soon as ``condition()`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
                self.reader.join(10)
                return
            if self.process.poll() is not None:
                self.reader.join(10)
                raise AssertionError(f"dvc repro ended before the kill point:\n{self.output}")
            time.sleep(0.005)
        os.killpg(self.process.pid, signal.SIGKILL)
        raise AssertionError(f"kill point not reached in {timeout} s:\n{self.output}")

    def finish(self, timeout: float = 600) -> str:
        self.process.wait(timeout)
        self.reader.join(10)
        assert self.process.returncode == 0, self.output
        return self.output


def _state(project: Path) -> dict:
    try:
        return json.loads((project / "checkpoints/pets_cnn/state.json").read_text())
    except (OSError, ValueError):
        return {}


def test_kill_9_in_every_stage_then_repro_completes_and_nothing_is_lost_or_doubled(tmp_path, server, http_root):
    folder = tmp_path / "pets"
    builders.image_folder(folder, classes=("cat", "dog"), per_class=600, size=(16, 16), mode="L")
    archive = builders.tar_gz(folder, http_root / "pets.tar.gz")
    server.throttle("/pets.tar.gz", 200_000)  # a few seconds of download to land in
    source = {"path": f"{server.url}/pets.tar.gz", "sha256": builders.sha256(archive.read_bytes())}
    experiment = {**PETS_CNN, "training": {**PETS_CNN["training"], "epochs": EPOCHS, "batch_size": 8,
                                          "checkpoint_interval_s": 0}}  # the kill lands after a checkpoint
    project = make_project(tmp_path / "proj", pets_params(source, {"pets_cnn": experiment}))
    cache = project / "data/cache/image_folder"

    # 1. download: bytes are arriving in the cache's temporary file
    Repro(project).kill_when(lambda: any(p.stat().st_size for p in cache.glob("*/.pets.tar.gz.partial-*")))
    assert not (project / "data/raw/pets").exists()
    assert not [p for p in cache.rglob("pets.tar.gz")], "nothing unverified under the real name"

    # 2. prepare: it has started reading the archive
    repro = Repro(project)
    repro.kill_when(lambda: "prepare pets: reading" in repro.output)
    assert (project / "data/raw/pets/pets.tar.gz").is_file()
    assert not (project / "data/prepared/pets.npz").exists()

    # 3. train: after its second epoch's checkpoint
    Repro(project).kill_when(lambda: _state(project).get("epoch", 0) >= 2)
    killed_at = _state(project)["epoch"]
    assert 2 <= killed_at < EPOCHS
    assert not (project / "models/pets_cnn/model.keras").exists()

    # 4. evaluate: it has loaded the model (training resumed and finished first)
    repro = Repro(project)
    repro.kill_when(lambda: "evaluate pets_cnn: classifier on the test split" in repro.output)
    assert f"resuming from checkpoint after epoch {killed_at} of {EPOCHS}" in repro.output
    assert not (project / "metrics/pets_cnn.json").exists()

    # 5. report: its MLflow run is open
    pending = project / "checkpoints/.report-run.json"
    Repro(project).kill_when(pending.is_file)
    killed_report = json.loads(pending.read_text())["run_id"]
    assert not (project / "reports/summary.md").exists()

    # 6. again, to the end
    last = Repro(project).finish()
    assert "Running stage 'report'" in last and "Running stage 'train@pets_cnn'" not in last
    assert f"MLflow run {killed_report} of a killed stage marked KILLED" in last
    status = run_dvc(project, "status")
    assert "Data and pipelines are up to date" in status.stdout, status.stdout  # every output verifies
    leftovers = [p for p in project.rglob("*.partial-*") if ".dvc" not in p.parts and ".git" not in p.parts]
    assert not leftovers, leftovers
    assert server.hits["/pets.tar.gz"] == 2  # the killed transfer, then one complete one

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [
        ("pets_cnn", "FINISHED"), ("report", "FINISHED"), ("report", "KILLED")]  # none RUNNING
    train_run = next(r for r in runs if r.info.run_name == "pets_cnn")
    steps = sorted(m.step for m in client.get_metric_history(train_run.info.run_id, "loss"))
    assert steps == list(range(1, EPOCHS + 1))  # resumed, each epoch logged once
    assert "test_accuracy" in train_run.data.metrics
    assert json.loads((project / "metrics/pets_cnn.json").read_text())["epochs"] == EPOCHS

    # 7. a prepared file damaged on disk afterwards: DVC sees it and restores it from its cache
    prepared = project / "data/prepared/pets.npz"
    good = prepared.read_bytes()
    prepared.write_bytes(good[: len(good) // 2])
    assert "modified:" in run_dvc(project, "status").stdout
    again = run_dvc(project, "repro")
    assert "Stage 'prepare@pets' is cached - skipping run, checking out outputs" in again.stdout, again.stdout
    assert ran(again.stdout) == set() and prepared.read_bytes() == good
