"""Concurrent writers on the embedded SQLite store: every run recorded, no
"database is locked" (through python -m benchmarks.bench_tracking, which the
docs' load figures come from)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_four_writers_on_one_sqlite_store_lose_nothing(tmp_path):
    out = tmp_path / "load.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_tracking", "--store", "sqlite",
                             "--writers", "4", "--runs", "3", "--epochs", "20", "--workdir", str(tmp_path),
                             "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(out.read_text())["rows"][0]
    assert row["runs"] == 12 and row["error_count"] == 0 and row["problems"] == []

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'sqlite-4' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("load").experiment_id])
    assert len(runs) == 12 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, 21))


def test_four_writers_on_the_postgresql_team_server_lose_and_double_nothing(tmp_path):
    """The same load over HTTP on the team server (PostgreSQL, two workers):
    the benchmark's own read-back finds each run once, FINISHED, with every
    metric point once and its artifact; checked again here through the REST API."""
    out = tmp_path / "load.json"
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_tracking", "--store", "postgres",
                             "--writers", "4", "--runs", "3", "--epochs", "20", "--server-workers", "2",
                             "--workdir", str(workdir), "--json", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(out.read_text())["rows"][0]
    assert row["store"] == "postgres" and row["server_workers"] == 2
    assert row["runs"] == 12 and row["error_count"] == 0 and row["problems"] == [], row
    assert row["runs_per_s"] > 0 and row["points_per_s"] > 0
