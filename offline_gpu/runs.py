"""Run experiments' train and evaluate stages side by side on one GPU.

``dvc repro`` runs one stage at a time; on a GPU that small models leave
mostly idle, several at once finish sooner. This runs the data stages the
chosen experiments need, then ``train`` and ``evaluate`` of every chosen
experiment at once (one process each, the GPU shared), with exactly the
commands and output paths of ``dvc.yaml``, so that ``dvc commit`` on the
same node afterwards records them in ``dvc.lock`` as if ``dvc repro`` had
run them (``offline_gpu/on_node.sh`` does). It packs what the stages wrote,
less the models and checkpoints, into ``OUT/results.tar.gz`` for bringing
home. The data files' md5 sums in ``OUT/summary.json`` must equal those in
``dvc.lock`` at home (the data stages are deterministic), or the outputs
were made from other data.

It also measures how reproducible training is there: ``--det-runs`` copies
of ``--det-experiment`` for ``--det-epochs`` epochs, half with XLA's default
GPU kernels and half with ``--xla_gpu_deterministic_ops=true``; the spread of
their test metrics goes into the summary.

    KERAS_BACKEND=jax DATA_MIRROR=mirror python -m offline_gpu.runs --out OUT \\
        mnist_denoise cifar10_cae_4pool cifar10_cae_3pool

``--set limits.max_epochs=1`` (repeatable) runs the same on a params copy:
a rehearsal on a CPU, never for outputs to commit.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.harness import ROOT, apply_overrides, data_needs, gpus, load_params, stage_command, stage_outputs
from stages.provenance import file_md5

log = logging.getLogger("offline_gpu.runs")


class Deadline:
    """A wall-clock time after which stages still running are stopped (None: never)."""

    def __init__(self, seconds: float | None):
        self.at = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())


NO_DEADLINE = Deadline(None)


def run(cmd: list[str], label: str, log_file: Path, env: dict, deadline: Deadline = NO_DEADLINE) -> None:
    """Run ``cmd`` in the project, its output in ``log_file``; past the
    deadline it is stopped with SIGTERM (train keeps its last checkpoint and
    resumes from it next time)."""
    with log_file.open("w") as handle:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env)
        try:
            code = process.wait(timeout=deadline.left())
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise SystemExit(f"offline_gpu.runs: {label} stopped at the deadline (log: {log_file})") from None
    if code != 0:
        sys.stderr.write(log_file.read_text()[-6000:])
        raise SystemExit(f"offline_gpu.runs: {label} failed with exit code {code} (log: {log_file})")


def under(prefix: Path, cmd: list[str], outputs: list[str]) -> list[str]:
    """``cmd`` with every word that names one of ``outputs``, a folder holding
    one or a path inside one, moved under ``prefix``."""
    def moved(word: str) -> bool:
        return any(word == out or out.startswith(word + "/") or word.startswith(out + "/") for out in outputs)

    return [str(prefix / word) if moved(word) else word for word in cmd]


def checkpoint_folder(name: str, item: dict) -> str:
    """Where dvc.yaml's train@name keeps its checkpoints (its ``--checkpoints``; not a DVC output)."""
    cmd = stage_command("train", name, item)
    return cmd[cmd.index("--checkpoints") + 1]


def experiment_outputs(name: str, item: dict) -> list[str]:
    """What dvc.yaml's train@name and evaluate@name write: their outputs and the checkpoints."""
    return [*stage_outputs("train", name, item), *stage_outputs("evaluate", name, item),
            checkpoint_folder(name, item)]


def run_stage(stage: str, key: str, item: dict, *, params: Path, logs: Path, env: dict, prefix: Path | None = None,
              deadline: Deadline = NO_DEADLINE) -> None:
    """dvc.yaml's command of ``stage@key`` with ``--params``, its output in
    ``logs/<stage>.<key>[.<prefix name>].log``; with ``prefix``, the
    experiment's outputs go under it instead of the project."""
    cmd = stage_command(stage, key, item)
    if prefix is not None:
        cmd = under(prefix, cmd, experiment_outputs(key, item))
    tag = f".{prefix.name}" if prefix is not None else ""
    run([*cmd, "--params", str(params)], f"{stage}@{key}{tag}", logs / f"{stage}.{key}{tag}.log", env, deadline)


def small_outputs(name: str, item: dict) -> list[str]:
    """The outputs of dvc.yaml's train@ and evaluate@ stages of ``name``, less
    the model (too large to bring back from the node; dvc.lock, committed
    there, records its md5). The checkpoints are no output: they stay too."""
    return [path for path in [*stage_outputs("train", name, item), *stage_outputs("evaluate", name, item)]
            if not path.endswith(".keras")]


def trained_here(model: Path, checkpoints: Path) -> bool:
    """Whether train finished here for this source commit (an earlier run on
    the same node, stopped in evaluate): its ``model`` is written, its
    checkpoint complete and the run.json beside the model names
    ``IMAGEPIPE_SOURCE_COMMIT``."""
    from stages.provenance import SOURCE_COMMIT

    commit = os.environ.get(SOURCE_COMMIT)
    try:
        state = json.loads((checkpoints / "state.json").read_text())
        ref = json.loads((model.parent / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return (bool(commit) and model.is_file() and bool(state.get("complete"))
            and ref.get("trained", {}).get("git_commit") == commit)


def train_and_evaluate(name: str, item: dict, params: Path, logs: Path, env: dict, prefix: Path | None = None,
                       deadline: Deadline = NO_DEADLINE) -> dict:
    """train@name then evaluate@name (``item``: the experiment's params); with
    ``prefix`` the outputs go under it instead of the project."""
    def path(rel: str) -> Path:
        return ROOT / (prefix / rel if prefix else rel)  # ROOT / absolute = absolute

    trains = stage_outputs("train", name, item)
    model = next(out for out in trains if out.endswith(".keras"))
    checkpoints = checkpoint_folder(name, item)
    [metrics_file] = stage_outputs("evaluate", name, item, fields=("metrics",))
    started = time.perf_counter()
    earlier = trained_here(path(model), path(checkpoints))
    if earlier:
        log.info("train@%s: trained by an earlier run at this commit; evaluate only", name)
    else:
        run_stage("train", name, item, params=params, logs=logs, env=env, prefix=prefix, deadline=deadline)
    trained = time.perf_counter()
    run_stage("evaluate", name, item, params=params, logs=logs, env=env, prefix=prefix, deadline=deadline)
    done = time.perf_counter()
    metrics = json.loads(path(metrics_file).read_text())
    return {"train_s": None if earlier else round(trained - started, 1), "evaluate_s": round(done - trained, 1),
            "test": metrics["test"], "epochs": metrics["epochs"], "trained": metrics.get("trained", {})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="*", help="experiments to train and evaluate")
    parser.add_argument("--out", type=Path, required=True, help="folder for the tarballs and summary.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param (dotted key, YAML value) in a copy of params.yaml")
    parser.add_argument("--det-experiment", default="mnist_cae")
    parser.add_argument("--det-epochs", type=int, default=2)
    parser.add_argument("--det-runs", type=int, default=4, help="half default kernels, half deterministic")
    parser.add_argument("--no-pack", action="store_true",
                        help="no results.tar.gz of the outputs (times and metrics only)")
    parser.add_argument("--deadline-s", type=float, help="stop the stages still running after this many seconds")
    parser.add_argument("--data-only", action="store_true",
                        help="only the data stages the experiments (and the determinism runs) need")
    parser.add_argument("--no-data", action="store_true",
                        help="no data stages: an earlier --data-only run made the data (only their md5 is taken)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    raw = load_params()
    unknown = [name for name in args.experiments + [args.det_experiment] if name not in raw["experiments"]]
    if unknown:
        parser.error(f"no experiment {', '.join(unknown)} in params.yaml (known: {', '.join(raw['experiments'])})")
    params_file = ROOT / "params.yaml"
    try:
        apply_overrides(raw, args.set)
    except ValueError as exc:
        parser.error(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="offline_gpu_runs_"))
    logs = work / "logs"
    logs.mkdir()
    if args.set:
        params_file = work / "params.yaml"
        params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONUNBUFFERED": "1"}
    summary: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "overrides": args.set,
                     "backend": os.environ.get("KERAS_BACKEND", "tensorflow")}
    summary["gpu"] = ", ".join(gpus()) or "none"

    def save() -> None:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    datasets, corruptions = data_needs(raw, args.experiments + ([args.det_experiment] if args.det_runs else []))
    deadline = Deadline(args.deadline_s)
    started = time.perf_counter()
    for ds in [] if args.no_data else datasets:
        for stage in ("download", "prepare"):
            run_stage(stage, ds, raw["datasets"][ds], params=params_file, logs=logs, env=env)
    for c in [] if args.no_data else corruptions:
        run_stage("corrupt", c, raw["corruptions"][c], params=params_file, logs=logs, env=env)
    summary["data_s"] = round(time.perf_counter() - started, 1)
    summary["data_md5"] = {str(p.relative_to(ROOT)): file_md5(p) for p in sorted(
        [*(ROOT / "data/prepared").glob("*.npz"), *(ROOT / "data/corrupted").glob("*.npz")])}
    save()
    log.info("data ready in %.1f s: %s", summary["data_s"], summary["data_md5"])
    if args.data_only:
        return 0

    # Every experiment and every determinism copy at once, one process each.
    from concurrent.futures import ThreadPoolExecutor, as_completed

    det_env = {**env, "XLA_FLAGS": (env.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()}
    det_params = work / "det.yaml"
    det_raw = copy.deepcopy(raw)  # the params of the runs above, overrides included
    det_raw["limits"]["max_epochs"] = args.det_epochs
    det_params.write_text(yaml.safe_dump(det_raw, sort_keys=False))
    summary["experiments"], summary["determinism"] = {}, {"experiment": args.det_experiment,
                                                          "epochs": args.det_epochs, "runs": {}}
    try:
        with ThreadPoolExecutor(max_workers=max(1, len(args.experiments) + args.det_runs)) as pool:
            jobs = {}
            for name in args.experiments:
                jobs[pool.submit(train_and_evaluate, name, raw["experiments"][name], params_file, logs, env, None,
                                 deadline)] = ("experiment", name)
            for i in range(args.det_runs):
                deterministic = i >= args.det_runs // 2
                prefix = work / f"det{i}{'_xla_deterministic' if deterministic else ''}"
                # each copy its own MLflow store: these runs are measurements, not results
                run_env = {**(det_env if deterministic else env),
                           "MLFLOW_TRACKING_URI": f"sqlite:///{prefix}/mlflow.db"}
                prefix.mkdir()
                jobs[pool.submit(train_and_evaluate, args.det_experiment, det_raw["experiments"][args.det_experiment],
                                 det_params, logs, run_env, prefix)] = ("determinism", prefix.name)
            wall = time.perf_counter()
            failed = []
            for future in as_completed(jobs):
                kind, name = jobs[future]
                try:
                    result = future.result()
                except (Exception, SystemExit) as exc:  # noqa: BLE001 - run_stage exits; the others go on
                    failed.append(f"{kind} {name}: {exc}".splitlines()[0])
                    log.error("%s %s failed: %s", kind, name, exc)
                    continue
                result["ended_s"] = round(time.perf_counter() - wall, 1)  # after the runs began: side by side
                if kind == "experiment":
                    summary["experiments"][name] = result
                else:
                    summary["determinism"]["runs"][name] = result
                summary["wall_s"] = round(time.perf_counter() - wall, 1)
                save()
                log.info("%s %s: %s", kind, name, json.dumps(result))
        if failed:
            summary["failed"] = failed
            raise SystemExit("offline_gpu.runs: " + "; ".join(failed))
    finally:  # the logs and what finished come back also when a run failed
        with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
            tar.add(logs, arcname="logs")
        if not args.no_pack:
            with tarfile.open(args.out / "results.tar.gz", "w:gz") as tar:
                for name in summary["experiments"]:
                    for rel in small_outputs(name, raw["experiments"][name]):
                        tar.add(ROOT / rel, arcname=rel)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
