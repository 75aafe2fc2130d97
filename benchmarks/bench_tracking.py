"""Tracking load: how many runs and metric points the MLflow stores take from
writers side by side, and whether any write fails ("database is locked").

Each writer is a process doing what a train stage does, as fast as it can:
create a run, log its params and tags, log ``--epochs`` epochs of four
metrics one ``log_batch`` per epoch (as ``stages.mlflow_run.MetricLog`` does),
log a small artifact, end the run; ``--runs`` times. Stores: the embedded
SQLite file; a real ``mlflow server`` on 127.0.0.1 with a SQLite backend and
one worker process (``server``); the team server of :mod:`cluster.team_server`,
a real PostgreSQL backend and ``--server-workers`` worker processes
(``postgres``). Every run is read back at the end: each run once, FINISHED,
every metric point of every run once, every artifact with its content.

    python -m benchmarks.bench_tracking                 # 1, 2, 4, 8 writers on every store
    python -m benchmarks.bench_tracking --writers 4 --store sqlite --json out.json
    python -m benchmarks.bench_tracking --uri http://127.0.0.1:5000 --writers 4   # a running server, e.g.
                                                  # the team server while pipelines log to it
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.harness import machine, write_results

log = logging.getLogger("bench_tracking")
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
ARTIFACT = "notes/run.txt"


def artifact_text(worker: int, run: int) -> str:
    return f"writer {worker} run {run}\n"


def writer(uri: str, experiment_name: str, worker: int, runs: int, epochs: int, ready, go, queue) -> None:
    """One process's share of the load, from when ``go`` is set (imports and
    connection set-up are not timed); puts (runs done, errors) on ``queue``."""
    os.environ.update({"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"})
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    errors, done = [], 0
    ready.release()
    go.wait()
    for r in range(runs):
        try:
            run_id = client.create_run(experiment.experiment_id, run_name=f"w{worker}-r{r}").info.run_id
            client.log_batch(run_id, params=[Param(f"p{i}", str(i)) for i in range(10)],
                             tags=[RunTag(f"t{i}", str(i)) for i in range(10)])
            for epoch in range(1, epochs + 1):
                now = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(k, 1.0 / epoch, now, epoch) for k in METRICS])
            client.log_text(run_id, artifact_text(worker, r), ARTIFACT)
            client.set_terminated(run_id, "FINISHED")
            done += 1
        except Exception as exc:  # noqa: BLE001 - counted and reported, that is the point
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
    queue.put((done, errors))


def check(uri: str, experiment_name: str, writers: int, runs: int, epochs: int) -> list[str]:
    """Each of the ``writers`` x ``runs`` runs recorded once, FINISHED, with
    every epoch of every metric once and its artifact: the problems found."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    found = client.search_runs([experiment.experiment_id], max_results=50_000)
    names = [run.info.run_name for run in found]
    expected = {f"w{w}-r{r}" for w in range(writers) for r in range(runs)}
    problems = [f"{len(found)} runs recorded, {len(expected)} expected"] if len(found) != len(expected) else []
    problems += [f"run {name} recorded {names.count(name)} times"
                 for name in sorted(set(names)) if names.count(name) > 1]
    problems += [f"run {name} missing" for name in sorted(expected - set(names))]
    for run in found:
        name = run.info.run_name
        if run.info.status != "FINISHED":
            problems.append(f"{name}: {run.info.status}")
        for key in METRICS:
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            if steps != list(range(1, epochs + 1)):
                problems.append(f"{name}: {key} has {len(steps)} points (steps {steps[:3]}...), {epochs} expected")
        worker, number = (int(part[1:]) for part in name.split("-"))
        text = client.download_artifacts(run.info.run_id, ARTIFACT, dst_path=tempfile.mkdtemp())
        if Path(text).read_text() != artifact_text(worker, number):
            problems.append(f"{name}: artifact {ARTIFACT} differs")
    return problems


def load(uri: str, writers: int, runs: int, epochs: int, artifacts: str | None = None,
         experiment_name: str = "load") -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if client.get_experiment_by_name(experiment_name) is not None:
        raise SystemExit(f"{uri}: experiment {experiment_name!r} exists already; the read-back needs a new one")
    client.create_experiment(experiment_name, artifact_location=artifacts)
    context = multiprocessing.get_context("spawn")
    queue, ready, go = context.Queue(), context.Semaphore(0), context.Event()
    processes = [context.Process(target=writer, args=(uri, experiment_name, w, runs, epochs, ready, go, queue))
                 for w in range(writers)]
    for p in processes:
        p.start()
    for _ in processes:
        ready.acquire(timeout=300)
    started = time.perf_counter()
    go.set()
    results = [queue.get(timeout=1800) for _ in processes]
    elapsed = time.perf_counter() - started
    for p in processes:
        p.join()
    done = sum(r[0] for r in results)
    errors = [e for r in results for e in r[1]]
    requests = done * (epochs + 4)
    return {"writers": writers, "runs": done, "epochs": epochs, "seconds": round(elapsed, 2),
            "runs_per_s": round(done / elapsed, 2), "points_per_s": round(done * epochs * len(METRICS) / elapsed),
            "requests_per_s": round(requests / elapsed), "errors": errors[:10], "error_count": len(errors),
            "problems": check(uri, experiment_name, writers, runs, epochs)}


@contextlib.contextmanager
def open_store(store: str, folder: Path, args: argparse.Namespace) -> Iterator[tuple[str, str | None]]:
    """The tracking URI of a new ``store`` in ``folder`` (started, and
    stopped afterwards) and the artifact location for its experiment (None:
    the store's own)."""
    from tests.mlflow_server import MlflowServer, TeamServer  # the tests' real servers on 127.0.0.1

    if store == "given":
        yield args.uri, None
    elif store == "sqlite":
        folder.mkdir(parents=True)
        yield f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()
    elif store == "server":
        server = MlflowServer(folder).start()
        try:
            yield server.url, None
        finally:
            server.stop()
    else:  # postgres; as root PostgreSQL runs as the postgres user, which must reach its folder
        database = Path(tempfile.mkdtemp(prefix="bench-tracking-pg-"))
        database.chmod(0o755)
        server = TeamServer(folder, ["--postgres", str(database), "--workers", str(args.server_workers),
                                     "--artifacts-destination", str(folder / "artifacts")])
        try:
            yield server.start().url, None
        finally:
            server.stop()  # and the PostgreSQL it started
            shutil.rmtree(database, ignore_errors=True)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["sqlite", "server", "postgres", "all"], default="all")
    parser.add_argument("--server-workers", type=int, default=4, help="worker processes of the postgres store's "
                        "team server (default 4)")
    parser.add_argument("--uri", help="load this running tracking server instead (e.g. the team server, "
                        "while pipelines log to it); --store is then ignored")
    parser.add_argument("--experiment", default="load", help="the MLflow experiment the writers create (default "
                        "load; it must not exist)")
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--runs", type=int, default=10, help="runs per writer")
    parser.add_argument("--epochs", type=int, default=50, help="epochs (log_batch calls) per run")
    parser.add_argument("--workdir", type=Path, help="where the stores go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the results here (default: "
                        "benchmarks/results/bench_tracking.json)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the read-back downloads

    results = {"machine": machine("mlflow", keras=False), "runs_per_writer": args.runs, "epochs": args.epochs,
               "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        stores = ["given"] if args.uri else ["sqlite", "server", "postgres"] if args.store == "all" else [args.store]
        for store in stores:
            for writers in args.writers:
                name = args.experiment if len(args.writers) == 1 else f"{args.experiment}-{writers}"
                with open_store(store, workdir / f"{store}-{writers}", args) as (uri, artifacts):
                    row = {"store": store, **load(uri, writers, args.runs, args.epochs, artifacts, name)}
                if store == "postgres":
                    row["server_workers"] = args.server_workers
                results["rows"].append(row)
                log.info("%-6s %d writers: %d runs in %.1f s, %.1f runs/s, %d metric points/s, %d errors%s",
                         store, writers, row["runs"], row["seconds"], row["runs_per_s"], row["points_per_s"],
                         row["error_count"], f", problems {row['problems'][:3]}" if row["problems"] else "")
    write_results(results, "bench_tracking", args.json)
    bad = [r for r in results["rows"] if r["error_count"] or r["problems"]]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
