"""Connecting to the MLflow store: which one, with what credentials and
timeouts, and the one-line error when it does not answer.

The store is ``MLFLOW_TRACKING_URI`` when set (a team server), else the
embedded SQLite database ``mlflow.db`` in the project root, which ``mlflow ui``
opens by default. ``dvc exp run --queue``/``--temp`` runs stages in a copy of
the project under ``<project>/.dvc/tmp/exps/``; the default store is resolved
to the project itself, so those runs are not lost with the copy. There is one
MLflow experiment per task kind (``autoencoders``, ``classifiers``) so the
UI's compare view lines up comparable runs. Credentials in the tracking URI
are never logged (:mod:`stages.urls`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stages.errors import PipelineError
from stages.urls import redact, redact_text, split_credentials

DEFAULT_URI = "sqlite:///mlflow.db"
EXPERIMENTS = {"autoencoder": "autoencoders", "classifier": "classifiers"}
# The MLflow UI treats an experiment with this tag as a model-training one
# (runs, models, charts), not a GenAI one (traces, prompts).
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"

# MLflow's usage telemetry, started by ``import mlflow`` (every stage imports it
# after this module), fetches its settings in a background thread; where that
# fails (no internet, a closed cluster network) the thread deletes an
# environment variable while the stage's HTTP requests read the environment
# (the proxy lookup), and a request fails with KeyError
# '_MLFLOW_TELEMETRY_SESSION_ID' (MLflow 3.17): a training lost to a race. The
# stages switch it off; MLFLOW_DISABLE_TELEMETRY=false set by the user wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


# An unreachable server must fail a stage within 30 s, not after MLflow's
# default of 7 retries with 120 s timeouts (many minutes). Worst case with
# these: 3 tries x 6 s + 1 + 2 s back-off + jitter, about 23 s. Users set
# MLflow's own variables to change them.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "6", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


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


def use_store() -> str:
    """Point MLflow at the store; returns the URI MLflow was given.

    Credentials in an http(s) URI are moved into ``MLFLOW_TRACKING_USERNAME``
    / ``MLFLOW_TRACKING_PASSWORD`` (MLflow sends them as basic auth), so the
    URI MLflow holds, prints in run links and puts in its errors has none.
    They replace credentials already in those variables: the URI names the
    user for this run; an exported variable may be left from another.
    """
    import mlflow

    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    uri, user, password = split_credentials(tracking_uri())
    if user is not None:  # the URI's own credentials win over ones exported earlier
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
    if password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
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


@contextmanager
def failures(what: str) -> Iterator[None]:
    """Turn an MLflow failure inside the block into a one-line TrackingError."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds for a store that fails
        raise TrackingError(f"{what}: MLflow store {tracking_label()} failed: {describe_failure(exc)}") from None


def connect(experiment: str) -> str:
    """Point MLflow at the store and the MLflow experiment ``experiment``; return its id."""
    import mlflow

    uri = use_store()
    try:
        with one_at_a_time(uri):
            found = mlflow.set_experiment(experiment)
            # a process that lost the race to create it got the experiment back but not
            # made active (MLflow 3.17 returns early on RESOURCE_ALREADY_EXISTS): by id it is
            mlflow.set_experiment(experiment_id=found.experiment_id)
            if EXPERIMENT_KIND not in found.tags:  # a kind a user chose in the UI stays
                tag_kind(found.experiment_id)
            return found.experiment_id
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds for an unusable store
        raise TrackingError(f"MLflow store {tracking_label()} unusable: {describe_failure(exc)}; "
                            "check that it is running and MLFLOW_TRACKING_URI") from None


def tag_kind(experiment_id: str) -> None:
    """Tag a new experiment as model training; another process that tagged it
    at the same moment (a database's unique-key error here) did the same."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    except Exception:  # noqa: BLE001 - the store's error for a duplicate key varies
        if EXPERIMENT_KIND not in client.get_experiment(experiment_id).tags:
            raise


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
