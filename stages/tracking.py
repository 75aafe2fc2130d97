"""MLflow tracking: where runs go, and the tags that tie a run to git and DVC.

The store is ``MLFLOW_TRACKING_URI`` when set (a team server), else the
embedded SQLite database ``mlflow.db`` in the project root, which ``mlflow ui``
opens by default. ``dvc exp run --queue``/``--temp`` runs stages in a copy of
the project under ``<project>/.dvc/tmp/exps/``; the default store is resolved
to the project itself, so those runs are not lost with the copy. There is one
MLflow experiment per task kind (``autoencoders``, ``classifiers``) so the
UI's compare view lines up comparable runs; each DVC experiment entry is one
run, named after it.

Every run is tagged with the git commit and dirty flag, the DVC experiment
name (``DVC_EXP_NAME``, set by ``dvc exp run``), the stage, and the md5 of
its input data as recorded in ``dvc.lock`` by the stage that produced it, and
a hash of its params. Credentials in the tracking URI are never logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
from pathlib import Path

import yaml

from stages.errors import PipelineError
from stages.fetch import redact

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
EXPERIMENTS = {"autoencoder": "autoencoders", "classifier": "classifiers"}


class TrackingError(PipelineError):
    """The MLflow store cannot be reached or used."""


def project_root(cwd: Path | None = None) -> Path:
    """The project a stage runs for: the working directory, or, inside a DVC
    experiment copy (``<project>/.dvc/tmp/exps/...``), the project it copies."""
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 3, 0, -1):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the project's ``mlflow.db`` as an absolute SQLite URI."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def tracking_label() -> str:
    """The store as recorded in files and logs: credentials redacted, no machine paths."""
    return redact(os.environ["MLFLOW_TRACKING_URI"]) if os.environ.get("MLFLOW_TRACKING_URI") else DEFAULT_URI


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested params -> {"a.b.c": "value"} for MLflow (which takes flat string params)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def params_hash(tree: dict) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_state(root: Path = Path(".")) -> dict[str, str]:
    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit or "unknown", "git_dirty": "unknown" if status is None else str(bool(status))}


def data_hashes(paths: list[str], lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """md5 of each path as recorded in dvc.lock by the stage that wrote it."""
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except OSError:
        return {}
    found = {}
    for entry in stages.values():
        for out in entry.get("outs", []):
            if out.get("path") in paths and "md5" in out:
                found[out["path"]] = out["md5"]
    return found


def environment() -> dict[str, str]:
    import keras

    versions = {"python": platform.python_version(), "keras": keras.__version__,
                "keras_backend": keras.backend.backend()}
    try:
        devices = keras.distribution.list_devices()
    except Exception:  # noqa: BLE001 - listing devices is best effort
        devices = []
    versions["devices"] = ",".join(devices) or "unknown"
    backend = keras.backend.backend()
    try:
        versions[backend] = __import__(backend).__version__
    except ImportError:
        pass
    return versions


def run_tags(task: str, experiment: str, stage: str, data: list[str], params: dict) -> dict[str, str]:
    tags = {
        "task": task, "experiment": experiment, "stage": stage,
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "params_hash": params_hash(params),
        **git_state(),
        **{f"data_md5.{path}": md5 for path, md5 in data_hashes(data).items()},
        **{f"env.{k}": v for k, v in environment().items()},
    }
    return tags


def connect(task: str) -> str:
    """Point MLflow at the store and the task's experiment; return the experiment id."""
    return connect_experiment(EXPERIMENTS[task])


def connect_experiment(name: str) -> str:
    """Point MLflow at the store and the experiment ``name``; return its id."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.set_experiment(name).experiment_id
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds for an unusable store
        message = str(exc).replace(uri, redact(uri))
        raise TrackingError(f"MLflow store {tracking_label()} unusable: {message}") from None


def start_run(run_id: str | None, name: str):
    """Start a new run named ``name``, or continue run ``run_id``; a clear error if it is gone."""
    import mlflow

    try:
        return mlflow.start_run(run_id=run_id, run_name=None if run_id else name)
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(
            f"MLflow run {run_id} for '{name}' cannot be continued in {tracking_label()}: "
            f"{exc.message if hasattr(exc, 'message') else exc}. Was it logged to another tracking URI?"
        ) from None


def save_run_ref(path: Path, run_id: str, experiment_id: str) -> None:
    """The DVC output that tells later stages (and people) which MLflow run this is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps({"run_id": run_id, "experiment_id": experiment_id,
                               "tracking_uri": tracking_label()}, indent=2) + "\n")
    os.replace(tmp, path)


def load_run_ref(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TrackingError(f"{path}: not found; run the train stage first") from None
    except json.JSONDecodeError as exc:
        raise TrackingError(f"{path}: not valid JSON ({exc})") from None
