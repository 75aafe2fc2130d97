"""Run a sweep of DVC experiments on a Ray cluster, one Ray task per experiment.

    python -m cluster.sweep -S 'experiments.mnist_cae.training.batch_size=64,128,256'
    python -m cluster.sweep --address auto --gpus 1 -n lr \\
        -S 'experiments.cifar10_cnn.training.learning_rate=0.01,0.001' \\
        -S 'experiments.cifar10_cnn.training.epochs=range(10,30,10)'

``-S`` takes DVC's own sweep syntax (``dvc exp run --queue -S``, parsed by
DVC's parser): a comma list, ``range(start, stop[, step])`` or
``choice(a, b, ...)``; several keys sweep their product. Each point becomes
one task, with ``--cpus`` / ``--gpus`` reserved for it, which on its node:

1. clones the project's git remote (``--git-remote``, the workers must reach
   it) and checks out the submitted commit (HEAD here, which must be pushed);
2. points the clone's DVC remote at the submitter's (``--dvc-remote``);
3. runs ``dvc exp run --pull -n <name>-<i> -S <point> <targets>``: inputs come
   from the DVC remote (or are made when they are not there), only the
   targets' stages run (by default ``evaluate@<experiment>`` for the
   experiments the keys name), and training logs to ``MLFLOW_TRACKING_URI`` (unset: the
   submitter's ``mlflow.db``, by its path);
4. pushes its result: ``dvc exp push`` (the experiment and its outputs) and
   ``dvc push`` (the outputs of its stages and of those they depend on).

As with ``dvc exp run``, a stage that ran before with the same code, params
and data is restored from the run-cache (the DVC remote's, when someone ran
``dvc push --run-cache``) instead of run again; its ``run.json`` then names
that earlier MLflow run. The sweep itself pushes no run-cache.

The submitter then ``dvc exp pull``s every finished experiment and logs
``dvc exp show``. A task whose node or worker dies is run again on another
node (``--retries`` times); with ``--checkpoints`` (or
``IMAGEPIPE_CHECKPOINTS``) a folder every node reaches, the training resumes
from its last checkpoint and continues the same MLflow run. A failing
experiment fails its own task, with its one-line error, and is not retried;
the others go on. The exit status is 1 when any experiment failed.

Without ``--address`` Ray's own lookup applies (``RAY_ADDRESS``, else the
last cluster ``ray start`` ran on this machine, else a new one on this
machine alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import time
from pathlib import Path

import yaml

from cluster.sweep_task import dvc_command, run_experiment

log = logging.getLogger("cluster.sweep")

PASSED_ON = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
             "DATA_MIRROR", "KERAS_BACKEND", "LOG_LEVEL")
SHARED_CHECKPOINTS = "IMAGEPIPE_CHECKPOINTS"  # stages.checkpoint.SHARED (not imported: no TensorFlow here)


class SweepError(RuntimeError):
    """Bad input, or a project not ready to sweep; the message names the value at fault."""


# --- the grid --------------------------------------------------------------------------------------------

def grid(sets: list[str]) -> list[list[str]]:
    """Every point of the ``-S`` values, each a list of ``dvc exp run -S`` overrides (DVC's parser)."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps
    from hydra.errors import HydraException

    points = []
    for value in sets:
        if "=" not in value.lstrip("~"):
            raise SweepError(f"-S {value!r}: expected KEY=VALUE[,VALUE...], range(...) or choice(...)")
    try:
        sweeps = get_hydra_sweeps(to_path_overrides(sets))
    except (InvalidArgumentError, HydraException) as exc:
        reason = " ".join(line for line in str(exc).splitlines() if not line.startswith("See https"))
        raise SweepError(f"-S {' '.join(sets)}: {reason}") from None
    for sweep in sweeps:
        points.append([override if path == "params.yaml" else f"{path}:{override}"
                       for path, overrides in sweep.items() for override in overrides])
    return points


def check_keys(root: Path, sets: list[str]) -> None:
    """Each key the sweep sets must exist in its params file (``+key`` adds one, as in DVC)."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import to_hydra_overrides

    for path, overrides in to_path_overrides(sets).items():
        if Path(path).suffix not in (".yaml", ".yml", ".json"):
            continue
        try:
            params = yaml.safe_load((root / path).read_text()) or {}
        except OSError as exc:
            raise SweepError(f"-S: cannot read {path} ({exc.strerror})") from None
        for override in to_hydra_overrides(overrides):
            if override.is_add() or override.is_force_add():
                continue
            node = params
            for part in override.key_or_group.split("."):
                if not isinstance(node, dict) or part not in node:
                    near = ", ".join(sorted(node)) if isinstance(node, dict) else "no keys"
                    raise SweepError(f"-S {override.input_line}: {path} has no key {override.key_or_group!r} "
                                     f"(no {part!r} there; it has: {near}); +{override.key_or_group}=... adds one")
                node = node[part]


def default_targets(points: list[list[str]]) -> list[str]:
    """``evaluate@<name>`` for each experiment the keys name; none (the whole pipeline) if a key is elsewhere."""
    names = []
    for override in points[0]:
        key = override.lstrip("+~").split("=", 1)[0]
        if not key.startswith("experiments.") or ":" in key:
            return []
        name = key.split(".")[1]
        if f"evaluate@{name}" not in names:
            names.append(f"evaluate@{name}")
    return names


# --- the submitter's project -------------------------------------------------------------------------------

def _run(cmd: list[str], cwd: Path, what: str) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise SweepError(f"{what}: {' '.join(cmd)} failed: {(result.stderr or result.stdout).strip()[-500:]}")
    return result.stdout.strip()


def git_source(root: Path, remote: str) -> tuple[str, str]:
    """The URL workers clone (``remote``'s) and the commit they check out (HEAD, which must be on it)."""
    commit = _run(["git", "rev-parse", "HEAD"], root, "the commit to run")
    try:
        url = _run(["git", "remote", "get-url", remote], root, "the git remote")
    except SweepError:
        raise SweepError(f"--git-remote {remote}: no such git remote in {root}; add one that every node "
                         f"reaches (git remote add {remote} URL) and push to it") from None
    if "://" not in url and (root / url).exists():
        url = str((root / url).resolve())  # a local path: the same on every node of a local cluster
    if not _run(["git", "for-each-ref", "--contains", commit, f"refs/remotes/{remote}"], root, "the commit"):
        raise SweepError(f"commit {commit[:7]} is not on git remote {remote!r} ({url}): git push it first; "
                         "every experiment clones it from there")
    if _run(["git", "status", "--porcelain", "--untracked-files=no"], root, "the working tree"):
        log.warning("uncommitted changes are not part of the sweep: it runs commit %s", commit[:7])
    return url, commit


def dvc_remote(root: Path, name: str | None) -> tuple[str, str]:
    """The DVC remote (``name``, by default the project's default) and its URL, as absolute as DVC reads it.

    From ``dvc config --list`` (every level merged, plain ``key=value`` lines):
    ``dvc remote list`` writes through Rich, which wraps a long line at the
    terminal's width (80 columns in a pipe) and pushes ``(default)`` onto a
    line of its own."""
    listed, default = {}, None
    for line in _run([dvc_command(), "config", "--list"], root, "the DVC remote").splitlines():
        key, _, value = line.partition("=")
        if key == "core.remote":
            default = value
        elif key.startswith("remote.") and key.endswith(".url"):
            listed[key[len("remote."):-len(".url")]] = value
    chosen = name or default
    if chosen not in listed:
        raise SweepError(f"--dvc-remote {chosen}: no such DVC remote (the project has: "
                         f"{', '.join(listed) or 'none'}); add one every node reaches: dvc remote add -d NAME URL")
    return chosen, listed[chosen]


# --- the sweep ---------------------------------------------------------------------------------------------

def outcome(ref, point: dict) -> dict:
    """``point`` with its task's result: status done, or failed with its one-line error."""
    import ray

    try:
        return {**point, "status": "done", **ray.get(ref)}
    except ray.exceptions.RayTaskError as exc:  # the experiment failed: not retried
        cause = exc.cause if isinstance(exc.cause, Exception) else exc
        return {**point, "status": "failed", "error": str(cause), "node": getattr(cause, "node", ""),
                "tail": getattr(cause, "tail", "")}
    except ray.exceptions.RayError as exc:  # its workers or nodes died, every try
        return {**point, "status": "failed", "error": str(exc).strip().splitlines()[0], "node": "", "tail": ""}


def run_sweep(specs: list[dict], address: str | None, resources: dict) -> list[dict]:
    """Submit one task a point and collect them as they end, logging each."""
    import ray

    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SweepError(f"--address {address or '(none)'}: no Ray cluster to run on: "
                         f"{str(exc).strip().splitlines()[0]}") from None
    try:
        task = ray.remote(run_experiment).options(**resources, retry_exceptions=False, scheduling_strategy="SPREAD")
        pending = {task.remote(spec): spec for spec in specs}
        log.info("%d experiments submitted to a cluster of %s", len(specs), ray.cluster_resources())
        results = []
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(ref)
            result = outcome(ref, {"name": spec["name"], "overrides": spec["overrides"]})
            if result["status"] == "done":
                log.info("%s done on node %s (%s) in %.0f s: %s", result["name"], result["node"][:12],
                         result["host"], result["seconds"], " ".join(spec["overrides"]))
            else:
                log.error("%s failed%s: %s", result["name"], f" on node {result['node'][:12]}" if result["node"]
                          else "", result["error"])
                log.debug("%s: its output ended with:\n%s", result["name"], result["tail"])
            results.append(result)
        return sorted(results, key=lambda r: [s["name"] for s in specs].index(r["name"]))
    finally:
        ray.shutdown()


def collect(root: Path, git_remote: str, names: list[str]) -> None:
    """Fetch the finished experiments (git refs and outputs) and log ``dvc exp show``."""
    if not names:
        return
    _run([dvc_command(), "exp", "pull", git_remote, *names], root, "dvc exp pull")
    table = _run([dvc_command(), "exp", "show", "--no-pager", "--only-changed", "--md"], root, "dvc exp show")
    log.info("%d experiments pulled; dvc exp show:\n%s", len(names), table)


def parse_args(argv):
    def at_least_0(kind):
        def parse(text: str):
            try:
                value = kind(text)
            except ValueError:
                value = -1
            if value < 0:
                raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'} "
                                                 "of 0 or more")
            return value
        return parse

    parser = argparse.ArgumentParser(prog="python -m cluster.sweep", description=__doc__.strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", help="DVC stages each experiment runs (default: evaluate@<name> "
                        "of the experiments the keys name; the whole pipeline when a key is elsewhere)")
    parser.add_argument("-S", "--set-param", dest="sets", action="append", required=True, metavar="KEY=VALUES",
                        help="a key and its values, in dvc exp run's syntax (repeat: their product is swept)")
    parser.add_argument("-n", "--name", default=time.strftime("sweep-%Y%m%d-%H%M%S"),
                        help="experiment names are NAME-1, NAME-2, ... (default: sweep-<date>-<time>)")
    parser.add_argument("--address", help="the Ray cluster (host:port or auto; default: Ray's lookup, see above)")
    parser.add_argument("--cpus", type=at_least_0(float), default=1.0, help="CPUs an experiment needs (default: 1)")
    parser.add_argument("--gpus", type=at_least_0(float), default=0.0, help="GPUs an experiment needs (default: 0)")
    parser.add_argument("--retries", type=at_least_0(int), default=3, help="times an experiment whose node or "
                        "worker died is run again (default: 3; a failing experiment is not)")
    parser.add_argument("--git-remote", default="origin", help="the git remote the nodes clone (default: origin)")
    parser.add_argument("--dvc-remote", help="the DVC remote the nodes pull from and push to (default: the default)")
    parser.add_argument("--checkpoints", default=os.environ.get(SHARED_CHECKPOINTS),
                        help=f"a folder every node reaches, for checkpoints a retry resumes from (default: "
                        f"${SHARED_CHECKPOINTS}; unset: a retried experiment trains from the start)")
    parser.add_argument("--workdir", help="where each node makes its clone (default: its temp folder)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help=f"set for every experiment (besides {', '.join(PASSED_ON)} when set here)")
    parser.add_argument("--summary", type=Path, help="write each experiment's outcome to this JSON file")
    return parser.parse_args(argv)


def experiment_env(args, root: Path) -> dict[str, str]:
    env = {key: os.environ[key] for key in PASSED_ON if os.environ.get(key)}
    if args.checkpoints:
        env[SHARED_CHECKPOINTS] = str(Path(args.checkpoints).expanduser().resolve())
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SweepError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    if "MLFLOW_TRACKING_URI" not in env:  # the project's own store, as the stages default to: here, by path
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        log.info("MLFLOW_TRACKING_URI is not set: the experiments log to %s, which only nodes that see this "
                 "machine's files reach; set it to the team server", env["MLFLOW_TRACKING_URI"])
    return env


def prepare_tracking(root: Path, env: dict[str, str]) -> None:
    """Check that the tracking server answers and make the project's MLflow experiments there, once, before
    any task starts: trainings that start together against a fresh server race to create them, and the
    loser's run lands in MLflow's "Default" experiment or fails (MLflow 3.x)."""
    from stages.errors import PipelineError
    from stages.mlflow_store import EXPERIMENTS, connect

    if not (root / "params.yaml").is_file():
        return
    experiments = (yaml.safe_load((root / "params.yaml").read_text()) or {}).get("experiments") or {}
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    for task in sorted({exp.get("task") for exp in experiments.values() if isinstance(exp, dict)} & set(EXPERIMENTS)):
        try:
            connect(EXPERIMENTS[task])
        except PipelineError as exc:
            raise SweepError(str(exc)) from None


def plan(args, root: Path) -> list[dict]:
    points = grid(args.sets)
    check_keys(root, args.sets)
    names = [f"{args.name}-{index}" for index in range(1, len(points) + 1)]
    for name in names:
        if subprocess.run(["git", "check-ref-format", f"refs/exps/{name}"]).returncode != 0:
            raise SweepError(f"--name {args.name!r}: {name!r} is not a valid experiment (git ref) name")
    repo, commit = git_source(root, args.git_remote)
    remote, url = dvc_remote(root, args.dvc_remote)
    targets = args.targets or default_targets(points)
    env = experiment_env(args, root)
    prepare_tracking(root, env)
    log.info("sweep of %d experiments of commit %s from %s, stages %s, DVC remote %s (%s), env %s", len(points),
             commit[:7], repo, " ".join(targets) or "all", remote, url, ", ".join(sorted(env)))
    return [{"name": name, "overrides": point, "repo": repo, "commit": commit, "dvc_remote": remote,
             "dvc_url": url, "targets": targets, "env": env, "workdir": args.workdir}
            for name, point in zip(names, points)]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        root = Path(_run(["git", "rev-parse", "--show-toplevel"], Path.cwd(), "the project"))
        specs = plan(args, root)
        resources = {"num_cpus": args.cpus, "num_gpus": args.gpus, "max_retries": args.retries}
        results = run_sweep(specs, args.address, resources)
        if args.summary:
            args.summary.write_text(json.dumps(results, indent=2) + "\n")
        collect(root, args.git_remote, [r["name"] for r in results if r["status"] == "done"])
    except SweepError as exc:
        log.error("sweep failed: %s", exc)
        return 1
    failed = [r["name"] for r in results if r["status"] != "done"]
    if failed:
        log.error("%d of %d experiments failed: %s", len(failed), len(results), ", ".join(failed))
        return 1
    log.info("all %d experiments done", len(results))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    raise SystemExit(main())
