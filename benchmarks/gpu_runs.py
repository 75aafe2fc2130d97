"""Run experiments' train and evaluate stages side by side on one GPU machine.

``dvc repro`` runs one stage at a time; on a GPU that small models leave
mostly idle, several at once finish sooner. This runs the data stages the
chosen experiments need, then ``train`` and ``evaluate`` of every chosen
experiment at once (one process each, the GPU shared), with exactly the
commands and output paths of ``dvc.yaml``, so that ``dvc commit`` on the
same machine afterwards records them in ``dvc.lock`` as if ``dvc repro`` had
run them (``benchmarks/gpu_session.sh`` does). It packs what the stages wrote,
less the models and checkpoints, into ``OUT/results.tar.gz`` for bringing
home. The data files' md5 sums in ``OUT/summary.json`` must equal those in
``dvc.lock`` at home (the data stages are deterministic), or the outputs
were made from other data.

It also measures how reproducible training is there: ``--det-runs`` copies
of ``--det-experiment`` for ``--det-epochs`` epochs, half with XLA's default
GPU kernels and half with ``--xla_gpu_deterministic_ops=true``; the spread of
their test metrics goes into the summary.

    KERAS_BACKEND=jax DATA_MIRROR=mirror python benchmarks/gpu_runs.py --out OUT \\
        mnist_denoise cifar10_cae_4pool cifar10_cae_3pool

``--set limits.max_epochs=1`` (repeatable) runs the same on a params copy:
a rehearsal on a CPU, never for outputs to commit.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
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

log = logging.getLogger("gpu_runs")
ROOT = Path(__file__).resolve().parents[1]
# the five seed questions' experiments (the CIFAR-10 autoencoder question is two)
SEEDS = ("mnist_cae", "mnist_denoise", "cifar10_cae_4pool", "cifar10_cae_3pool", "cifar10_cnn", "colored_mnist_cnn")


class Deadline:
    """A wall-clock time after which stages still running are stopped (None: never)."""

    def __init__(self, seconds: float | None):
        self.at = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())


NO_DEADLINE = Deadline(None)


def run_stage(name: str, target: str, *args: str, params: Path, logs: Path, env: dict, tag: str = "",
              deadline: Deadline = NO_DEADLINE) -> None:
    """Run ``python -m stages.<name> <target> ...``, its output in
    ``logs/<name>.<target><tag>.log``; past the deadline it is stopped with
    SIGTERM (train keeps its last checkpoint and resumes from it next time)."""
    log_file = logs / f"{name}.{target}{tag}.log"
    cmd = [sys.executable, "-m", f"stages.{name}", target, *args, "--params", str(params)]
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
            raise SystemExit(f"gpu_runs: {name}@{target}{tag} stopped at the deadline (log: {log_file})") from None
    if code != 0:
        sys.stderr.write(log_file.read_text()[-6000:])
        raise SystemExit(f"gpu_runs: {name}@{target}{tag} failed with exit code {code} (log: {log_file})")


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_needs(params: dict, experiments: list[str]) -> tuple[list[str], list[str]]:
    """The datasets to download/prepare and the corruptions to make for these experiments."""
    datasets, corruptions = set(), set()
    for name in experiments:
        data = params["experiments"][name]["data"]
        for ref in (data["input"], data["target"]):
            kind, stem = ref.split("/", 1)
            if kind == "corrupted":
                corruptions.add(stem)
                datasets.add(params["corruptions"][stem]["dataset"])
            else:
                datasets.add(stem)
    return sorted(datasets), sorted(corruptions)


def apply_overrides(params: dict, items: list[str], new_keys: bool = False) -> dict:
    """Set each ``dotted.key=yaml-value`` in ``params`` (in place); only keys
    that exist, or with ``new_keys`` also keys and sections that do not (an
    option left at its default; the caller validates the result)."""
    for item in items:
        key, sep, value = item.partition("=")
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            if new_keys:
                node.setdefault(part, {})
            if not isinstance(node.get(part), dict):
                raise ValueError(f"--set {item}: params.yaml has no section '{part}' on the way to '{key}'")
            node = node[part]
        if not sep or (leaf not in node and not new_keys):
            raise ValueError(f"--set {item}: expected KEY=VALUE" + ("" if new_keys else " with KEY an existing param"))
        node[leaf] = yaml.safe_load(value)
    return params


def small_outputs(name: str) -> list[str]:
    """What dvc.yaml's train@ and evaluate@ stages of ``name`` write, less the
    model and its checkpoints (too large to bring back from the GPU machine;
    dvc.lock, committed there, records their md5)."""
    return [f"models/{name}/history.json", f"models/{name}/run.json", f"metrics/{name}.json",
            f"plots/{name}.json", f"reports/{name}"]


def trained_here(model_dir: Path, checkpoints: Path) -> bool:
    """Whether train finished here for this source commit (an earlier call on
    the same machine, stopped in evaluate): its model is written, its
    checkpoint complete and its run.json names ``IMAGEPIPE_SOURCE_COMMIT``."""
    from stages.tracking import SOURCE_COMMIT

    commit = os.environ.get(SOURCE_COMMIT)
    try:
        state = json.loads((checkpoints / "state.json").read_text())
        ref = json.loads((model_dir / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return (bool(commit) and (model_dir / "model.keras").is_file() and bool(state.get("complete"))
            and ref.get("trained", {}).get("git_commit") == commit)


def train_and_evaluate(name: str, params: Path, logs: Path, env: dict, prefix: Path | None = None,
                       deadline: Deadline = NO_DEADLINE) -> dict:
    """train@name then evaluate@name; with ``prefix`` the outputs go under it instead of the project."""
    def path(rel: str) -> str:
        return str(prefix / rel) if prefix else rel

    started = time.perf_counter()
    tag = f".{prefix.name}" if prefix else ""
    earlier = trained_here(ROOT / path(f"models/{name}"), ROOT / path(f"checkpoints/{name}"))
    if earlier:
        log.info("train@%s: trained by an earlier call at this commit; evaluate only", name)
    else:
        run_stage("train", name, "--out", path(f"models/{name}"), "--checkpoints", path(f"checkpoints/{name}"),
                  params=params, logs=logs, env=env, tag=tag, deadline=deadline)
    trained = time.perf_counter()
    run_stage("evaluate", name, "--model", path(f"models/{name}"), "--metrics", path(f"metrics/{name}.json"),
              "--reports", path(f"reports/{name}"), "--plots", path(f"plots/{name}.json"),
              params=params, logs=logs, env=env, tag=tag, deadline=deadline)
    done = time.perf_counter()
    metrics = json.loads((ROOT / path(f"metrics/{name}.json")).read_text())  # ROOT / absolute = absolute
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
                        help="no data stages: an earlier --data-only call made the data (only their md5 is taken)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    unknown = [name for name in args.experiments + [args.det_experiment] if name not in raw["experiments"]]
    if unknown:
        parser.error(f"no experiment {', '.join(unknown)} in params.yaml (known: {', '.join(raw['experiments'])})")
    params_file = ROOT / "params.yaml"
    try:
        apply_overrides(raw, args.set)
    except ValueError as exc:
        parser.error(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_runs_"))
    logs = work / "logs"
    logs.mkdir()
    if args.set:
        params_file = work / "params.yaml"
        params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONUNBUFFERED": "1"}
    summary: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "overrides": args.set,
                     "backend": os.environ.get("KERAS_BACKEND", "tensorflow")}
    from hostinfo import gpus  # benchmarks/, this script's folder

    summary["gpu"] = ", ".join(gpus()) or "none"

    def save() -> None:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    datasets, corruptions = data_needs(raw, args.experiments + ([args.det_experiment] if args.det_runs else []))
    deadline = Deadline(args.deadline_s)
    started = time.perf_counter()
    for ds in [] if args.no_data else datasets:
        run_stage("download", ds, "--out", f"data/raw/{ds}", params=params_file, logs=logs, env=env)
        run_stage("prepare", ds, "--raw", f"data/raw/{ds}", "--out", f"data/prepared/{ds}.npz",
                  params=params_file, logs=logs, env=env)
    for c in [] if args.no_data else corruptions:
        ds = raw["corruptions"][c]["dataset"]
        run_stage("corrupt", c, "--data", f"data/prepared/{ds}.npz", "--out", f"data/corrupted/{c}.npz",
                  params=params_file, logs=logs, env=env)
    summary["data_s"] = round(time.perf_counter() - started, 1)
    summary["data_md5"] = {str(p.relative_to(ROOT)): md5(p) for p in sorted(
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
                jobs[pool.submit(train_and_evaluate, name, params_file, logs, env, None, deadline)] = (
                    "experiment", name)
            for i in range(args.det_runs):
                deterministic = i >= args.det_runs // 2
                prefix = work / f"det{i}{'_xla_deterministic' if deterministic else ''}"
                # each copy its own MLflow store: these runs are measurements, not results
                run_env = {**(det_env if deterministic else env),
                           "MLFLOW_TRACKING_URI": f"sqlite:///{prefix}/mlflow.db"}
                prefix.mkdir()
                jobs[pool.submit(train_and_evaluate, args.det_experiment, det_params, logs, run_env, prefix)] = (
                    "determinism", prefix.name)
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
            raise SystemExit("gpu_runs: " + "; ".join(failed))
    finally:  # the logs and what finished come back also when a run failed
        with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
            tar.add(logs, arcname="logs")
        if not args.no_pack:
            with tarfile.open(args.out / "results.tar.gz", "w:gz") as tar:
                for name in summary["experiments"]:
                    for rel in small_outputs(name):
                        tar.add(ROOT / rel, arcname=rel)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
