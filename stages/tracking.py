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
import re
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from stages import atomic
from stages.errors import PipelineError
from stages.fetch import redact

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
EXPERIMENTS = {"autoencoder": "autoencoders", "classifier": "classifiers"}


class TrackingError(PipelineError):
    """The MLflow store cannot be reached or used."""

    next_step = ("check MLFLOW_TRACKING_URI (unset: the project's mlflow.db) and that the store answers, then "
                 "run the stage again: finished epochs are kept in checkpoints/")


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


# the commit a copy of the source tree came from, set by whoever made the copy
# (benchmarks/gpu_session.sh): such a copy has no .git to ask, or an older one
# (one GPU machine's copy answered with the commit its session started from)
SOURCE_COMMIT = "IMAGEPIPE_SOURCE_COMMIT"


def git_state(root: Path = Path(".")) -> dict[str, str]:
    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    if os.environ.get(SOURCE_COMMIT):  # a copy of the tree whose own .git, if any, is not the source's
        return {"git_commit": os.environ[SOURCE_COMMIT], "git_dirty": "unknown"}
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


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def accelerators() -> str:
    """The accelerators the backend trains on, by their product name
    ("NVIDIA H200"), or "none"."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        kinds = [d.device_kind for d in jax.local_devices() if d.platform != "cpu"]
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        kinds = [tf.config.experimental.get_device_details(d).get("device_name", d.name)
                 for d in tf.config.list_physical_devices("GPU")]
    else:
        kinds = []
    return ", ".join(f"{n} x {kind}" if n > 1 else kind for kind, n in
                     ((k, kinds.count(k)) for k in dict.fromkeys(kinds))) or "none"


def environment() -> dict[str, str]:
    """Where a run ran: the machine's CPU and accelerators, the Keras backend
    and the versions that decide its numbers."""
    import keras
    import numpy as np

    versions = {"python": platform.python_version(), "keras": keras.__version__,
                "keras_backend": keras.backend.backend(), "cpu": cpu_model(), "accelerator": accelerators(),
                "numpy": np.__version__}
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


# An unreachable server must fail a stage within 30 s, not after MLflow's
# default of 7 retries with 120 s timeouts (many minutes). Worst case with
# these: 3 tries x 6 s + 1 + 2 s back-off + jitter, about 23 s. Users set
# MLflow's own variables to change them.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "6", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``http://user:pw@host/x`` -> (``http://host/x``, user, pw); other URIs unchanged."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or (parts.username is None and parts.password is None):
        return uri, None, None
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    bare = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return (bare, urllib.parse.unquote(parts.username or ""),
            urllib.parse.unquote(parts.password) if parts.password is not None else None)


def use_store() -> str:
    """Point MLflow at the store; returns the URI MLflow was given.

    Credentials in an http(s) URI are moved into ``MLFLOW_TRACKING_USERNAME``
    / ``MLFLOW_TRACKING_PASSWORD`` (MLflow sends them as basic auth), so the
    URI MLflow holds, prints in run links and puts in its errors has none.
    """
    import mlflow

    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    uri, user, password = split_credentials(tracking_uri())
    if user is not None:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user)
    if password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    return uri


def describe_failure(exc: BaseException) -> str:
    """A one-line reason for an MLflow failure, without URLs (and so without credentials)."""
    text = str(exc)
    for marker, reason in (("Connection refused", "connection refused"),
                           ("NewConnectionError", "cannot connect"),
                           ("NameResolutionError", "host name not found"),
                           ("ReadTimeout", f"no answer within {os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT')} s"),
                           ("ConnectTimeout", "connection timed out"),
                           ("RemoteDisconnected", "connection closed by the server"),
                           ("database is locked", "database is locked")):
        if marker in text:
            tries = 1 + int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") or 0)
            return reason + (f" ({tries} tries)" if tracking_label().startswith(("http://", "https://")) else "")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return redact_text(first)[:300]


def redact_text(text: str) -> str:
    """``text`` with credentials in any URL it contains removed."""
    return re.sub(r"(\w[\w+.-]*://)[^/@\s]*@", r"\1***@", text)


def connect(task: str) -> str:
    """Point MLflow at the store and the task's experiment; return the experiment id."""
    return connect_experiment(EXPERIMENTS[task])


def connect_experiment(name: str) -> str:
    """Point MLflow at the store and the experiment ``name``; return its id."""
    import mlflow

    uri = use_store()
    try:
        with one_at_a_time(uri):
            return mlflow.set_experiment(name).experiment_id
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds for an unusable store
        raise TrackingError(f"MLflow store {tracking_label()} unusable: {describe_failure(exc)}; "
                            "check that it is running and MLFLOW_TRACKING_URI") from None


@contextmanager
def one_at_a_time(uri: str) -> Iterator[None]:
    """For a SQLite store: one process of this machine at a time in the block.

    Connecting creates the store's tables (MLflow's migrations) and the
    experiment when they do not exist yet; processes that do it at the same
    moment (experiments trained side by side, ``dvc queue start -j N``) fail
    with "table ... already exists". An exclusive lock on a file in the temp
    folder, named after the database's path, lets the first create them while
    the others wait. A server (http) store does this on its own side."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    database = os.path.abspath(uri[len("sqlite:///"):])
    lock = Path(tempfile.gettempdir()) / f"imagepipe-mlflow-{hashlib.sha256(database.encode()).hexdigest()[:16]}.lock"
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def start_run(run_id: str | None, name: str):
    """Start a new run named ``name``, or continue run ``run_id``; a clear error if it is gone."""
    import mlflow

    try:
        return mlflow.start_run(run_id=run_id, run_name=None if run_id else name)
    except mlflow.exceptions.MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise TrackingError(
                f"MLflow run {run_id} for '{name}' cannot be continued in {tracking_label()}: "
                f"{describe_failure(exc)}. Was it logged to another tracking URI?") from None
        action = f"continue run {run_id}" if run_id else "start a run"
        raise TrackingError(f"MLflow store {tracking_label()}: cannot {action} for '{name}': "
                            f"{describe_failure(exc)}") from None


@contextmanager
def failures(what: str) -> Iterator[None]:
    """Turn an MLflow failure inside the block into a one-line TrackingError."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds for a store that fails
        raise TrackingError(f"{what}: MLflow store {tracking_label()} failed: {describe_failure(exc)}") from None


@contextmanager
def ending_run(what: str) -> Iterator[None]:
    """The block logs into the active run; then the run ends FINISHED, or FAILED
    (as far as the store answers) with any MLflow failure as a one-line TrackingError."""
    import mlflow

    try:
        with failures(what):
            yield
            mlflow.end_run()
    except BaseException:
        end_run_quietly("FAILED")
        raise


def end_run_quietly(status: str) -> None:
    """End the active run as ``status`` if the store answers; a failure is only logged."""
    import mlflow

    try:
        mlflow.end_run(status=status)
    except Exception as exc:  # noqa: BLE001 - already failing; the store may be the cause
        log.warning("MLflow run not marked %s: %s", status, describe_failure(exc))


def abandon(run_id: str, what: str = "an interrupted training with other params or data") -> None:
    """Mark a run left RUNNING by a process that is gone, and that nobody will continue, as KILLED."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
            log.info("MLflow run %s of %s stage marked KILLED", run_id, what)
    except Exception as exc:  # noqa: BLE001 - best effort: it may live in another store
        log.info("MLflow run %s of %s stage not marked KILLED: %s", run_id, what, describe_failure(exc))


class PendingRun:
    """A marker file naming the run a stage has open, so that a run whose
    process was killed (and which nobody will continue) is marked KILLED by the
    next run of the stage instead of staying RUNNING forever."""

    def __init__(self, marker: Path):
        self.marker = marker

    def reap(self) -> None:
        try:
            pending = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return
        if not atomic.process_alive(int(pending.get("pid", 0))):
            abandon(pending["run_id"], "a killed")
            self.marker.unlink(missing_ok=True)

    def hold(self, run_id: str) -> None:
        atomic.write_text(self.marker, json.dumps({"run_id": run_id, "pid": os.getpid()}))

    def release(self) -> None:
        self.marker.unlink(missing_ok=True)


class MetricLog:
    """Per-epoch metrics of one run, sent in one request per flush.

    A store that does not answer does not stop training: the epochs stay in
    the history (and the checkpoint) and go with a later flush. After a
    failure the next try waits ``pause_s``, so an outage costs one timeout,
    not one per epoch. ``flush(..., required=True)`` raises instead.
    """

    def __init__(self, run_id: str, logged: int = 0, pause_s: float = 30.0):
        self.run_id, self.logged, self.pause_s = run_id, logged, pause_s
        self._retry_at = 0.0

    def flush(self, history: dict[str, list[float]], upto: int, required: bool = False) -> bool:
        """Send epochs ``logged+1..upto``; True if all of them are now logged."""
        import time

        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        if self.logged >= upto:
            return True
        if not required and time.monotonic() < self._retry_at:
            return False
        now = int(time.time() * 1000)
        batch = [Metric(key, float(values[step - 1]), now, step)
                 for step in range(self.logged + 1, upto + 1) for key, values in history.items()]
        try:
            for start in range(0, len(batch), 1000):  # MLflow's limit per log_batch
                MlflowClient().log_batch(self.run_id, metrics=batch[start:start + 1000], synchronous=True)
        except Exception as exc:  # noqa: BLE001 - any store failure: keep training, say so once
            reason = describe_failure(exc)
            if required:
                raise TrackingError(f"MLflow store {tracking_label()} did not take the metrics of run "
                                    f"{self.run_id}: {reason}") from None
            log.warning("MLflow store %s did not answer (%s); epochs %d-%d are kept and sent later",
                        tracking_label(), reason, self.logged + 1, upto)
            self._retry_at = time.monotonic() + self.pause_s
            return False
        self.logged = upto
        return True


def save_run_ref(path: Path, run_id: str, experiment_id: str, trained: dict | None = None) -> None:
    """The DVC output that tells later stages (and people) which MLflow run
    this is and, as ``trained``, how the model was trained: where (machine,
    backend, versions, commit), how many epochs and how long."""
    ref = {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": tracking_label()}
    if trained is not None:
        ref["trained"] = trained
    atomic.write_text(path, json.dumps(ref, indent=2) + "\n")


def load_run_ref(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TrackingError(f"{path}: not found; run the train stage first") from None
    except json.JSONDecodeError as exc:
        raise TrackingError(f"{path}: not valid JSON ({exc})") from None
