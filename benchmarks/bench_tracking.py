"""Tracking load: how many runs and metric points the MLflow stores take from
writers side by side, and whether any write fails ("database is locked").

Each writer is a process doing what a train stage does, as fast as it can:
create a run, log its params and tags, log ``--epochs`` epochs of four
metrics one ``log_batch`` per epoch (as ``stages.mlflow_run.MetricLog`` does),
end the run; ``--runs`` times. Stores: the embedded SQLite file, and a real
``mlflow server`` on 127.0.0.1 (SQLite backend, local artifacts, one worker
process). Every run is read back at the end and checked complete.

    python -m benchmarks.bench_tracking                 # 1, 2, 4, 8 writers on both stores
    python -m benchmarks.bench_tracking --writers 4 --store sqlite --json out.json
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

from benchmarks.harness import machine, write_results

log = logging.getLogger("bench_tracking")
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


def writer(uri: str, worker: int, runs: int, epochs: int, ready, go, queue) -> None:
    """One process's share of the load, from when ``go`` is set (imports and
    connection set-up are not timed); puts (runs done, errors) on ``queue``."""
    os.environ.update({"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"})
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("load")
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
            client.set_terminated(run_id, "FINISHED")
            done += 1
        except Exception as exc:  # noqa: BLE001 - counted and reported, that is the point
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
    queue.put((done, errors))


def check(uri: str, expected_runs: int, epochs: int) -> list[str]:
    """Every run FINISHED with every epoch of every metric: the problems found."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("load")
    runs = client.search_runs([experiment.experiment_id], max_results=50_000)
    problems = [] if len(runs) == expected_runs else [f"{len(runs)} runs recorded, {expected_runs} expected"]
    for run in runs:
        if run.info.status != "FINISHED":
            problems.append(f"{run.info.run_name}: {run.info.status}")
    for run in runs[:5]:  # full histories of a sample; the count above covers the rest
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
        if sorted(steps) != list(range(1, epochs + 1)):
            problems.append(f"{run.info.run_name}: val_loss steps {sorted(steps)[:5]}...")
    return problems


def load(uri: str, writers: int, runs: int, epochs: int) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if client.get_experiment_by_name("load") is None:
        client.create_experiment("load")
    context = multiprocessing.get_context("spawn")
    queue, ready, go = context.Queue(), context.Semaphore(0), context.Event()
    processes = [context.Process(target=writer, args=(uri, w, runs, epochs, ready, go, queue))
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
    requests = done * (epochs + 3)
    return {"writers": writers, "runs": done, "epochs": epochs, "seconds": round(elapsed, 2),
            "runs_per_s": round(done / elapsed, 2), "points_per_s": round(done * epochs * len(METRICS) / elapsed),
            "requests_per_s": round(requests / elapsed), "errors": errors[:10], "error_count": len(errors),
            "problems": check(uri, writers * runs, epochs)}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["sqlite", "server", "both"], default="both")
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--runs", type=int, default=10, help="runs per writer")
    parser.add_argument("--epochs", type=int, default=50, help="epochs (log_batch calls) per run")
    parser.add_argument("--workdir", type=Path, help="where the stores go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the results here (default: "
                        "benchmarks/results/bench_tracking.json)")
    args = parser.parse_args(argv)
    from tests.mlflow_server import MlflowServer  # the tests' real server on 127.0.0.1

    results = {"machine": machine("mlflow", keras=False), "runs_per_writer": args.runs, "epochs": args.epochs,
               "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        for store in (["sqlite", "server"] if args.store == "both" else [args.store]):
            for writers in args.writers:
                folder = workdir / f"{store}-{writers}"
                server = None
                if store == "server":
                    server = MlflowServer(folder).start()
                    uri = server.url
                else:
                    folder.mkdir(parents=True)
                    uri = f"sqlite:///{folder / 'mlflow.db'}"
                try:
                    row = {"store": store, **load(uri, writers, args.runs, args.epochs)}
                finally:
                    if server:
                        server.stop()
                results["rows"].append(row)
                log.info("%-6s %d writers: %d runs in %.1f s, %.1f runs/s, %d metric points/s, %d errors%s",
                         store, writers, row["runs"], row["seconds"], row["runs_per_s"], row["points_per_s"],
                         row["error_count"], f", problems {row['problems'][:3]}" if row["problems"] else "")
    write_results(results, "bench_tracking", args.json)
    bad = [r for r in results["rows"] if r["error_count"] or r["problems"]]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
