"""The team tracking server: one ``mlflow server`` that every machine of a
team logs to over HTTP, its runs in PostgreSQL and its artifacts in a store of
their own, served through it.

    python -m cluster.team_server --postgres .team/postgres --artifacts-destination .team/artifacts
    MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:PW@db.example:5432/mlflow \\
        python -m cluster.team_server --artifacts-destination s3://bucket/mlflow --host 0.0.0.0

``--postgres DIR`` starts a PostgreSQL of its own (:mod:`cluster.postgres`,
the cluster in ``DIR/data``) and creates the ``mlflow`` database; the
passwords of its roles are kept in ``DIR/credentials.json`` (mode 0600), so
the next start reuses them. Otherwise the backend store is
``--backend-store-uri`` (or ``MLFLOW_BACKEND_STORE_URI``, which keeps the
password off the command line): PostgreSQL, or SQLite for a try-out.

``--auth`` turns on MLflow's basic auth (``--app-name basic-auth``): its users
live in a second database (``mlflow_auth`` with ``--postgres``,
``--auth-database-uri`` otherwise) and the admin user is created on the first
start with ``MLFLOW_AUTH_ADMIN_PASSWORD`` (or ``--admin-password-file``).
Clients put ``user:password@`` in ``MLFLOW_TRACKING_URI``.

A PostgreSQL that restarts needs no restart of the server: MLflow's engine
checks a pooled connection before it uses it (SQLAlchemy's pre-ping), so the
first request after the restart gets a fresh one; requests while it is down
fail with 503, and the stages keep those epochs and send them later
(tests/test_team_server.py shows both).

The command waits until the server answers, logs the URL to set as
``MLFLOW_TRACKING_URI``, and on SIGTERM or SIGINT stops the server (all its
workers) and the PostgreSQL it started. Passwords are never logged.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from cluster.postgres import Postgres, PostgresError
from stages.urls import redact, redact_text

log = logging.getLogger("cluster.team_server")

MLFLOW = Path(sys.executable).with_name("mlflow")
SCHEMES = ("postgresql", "sqlite")
# MLflow's job runner serves only its GenAI features; its consumers would compete for the CPU
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class TeamServerError(RuntimeError):
    """The server cannot start as asked; the message names the value at fault."""


class _Stop(Exception):
    """SIGTERM or SIGINT arrived."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command's options; what follows ``--`` goes to ``mlflow server`` as it is (``server_args``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="python -m cluster.team_server", usage="%(prog)s [options] [-- MLFLOW-SERVER-OPTIONS]",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog="Options after -- go to mlflow server as they are, e.g. -- --allowed-hosts mlflow.example.org:5000 "
               "(needed with --host 0.0.0.0 when clients use a host name).")
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--postgres", type=Path, metavar="DIR",
                       help="start a PostgreSQL of its own with its data in DIR (created on first use)")
    store.add_argument("--backend-store-uri", default=os.environ.get("MLFLOW_BACKEND_STORE_URI"), metavar="URI",
                       help="postgresql://USER:PASSWORD@HOST:PORT/DB (or sqlite:///FILE); default "
                            "MLFLOW_BACKEND_STORE_URI")
    parser.add_argument("--artifacts-destination", default="mlartifacts", metavar="URI",
                        help="where artifacts go: a local folder (default mlartifacts) or s3://bucket/path "
                             "(AWS_* variables, MLFLOW_S3_ENDPOINT_URL for an S3-compatible store)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every one)")
    parser.add_argument("--port", type=int, default=5000, help="port to listen on (default 5000)")
    parser.add_argument("--workers", type=int, default=4, help="server worker processes (default 4)")
    parser.add_argument("--auth", action="store_true", help="require basic auth (MLflow's basic-auth app)")
    parser.add_argument("--auth-database-uri", metavar="URI",
                        help="the users' database with --auth (default: mlflow_auth beside --postgres's "
                             "mlflow, basic_auth.db beside a SQLite store)")
    parser.add_argument("--admin-user", default=os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin"),
                        help="the admin created on the first start with --auth (default admin)")
    parser.add_argument("--admin-password-file", type=Path, metavar="FILE",
                        help="the admin's first password (default MLFLOW_AUTH_ADMIN_PASSWORD)")
    parser.add_argument("--auth-cache-s", type=int, default=60, metavar="SECONDS",
                        help="with --auth, how long a worker trusts a checked user:password (default 60; each "
                             "check costs a scrypt hash, about 0.1 s of CPU; 0: check every request). A "
                             "password changed or a user deleted reaches the other workers after this long")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for the server to answer")
    args = parser.parse_args(ours)
    args.server_args = extra
    return args


# --- checks before anything starts


def check_scheme(uri: str, what: str) -> str:
    scheme = urllib.parse.urlsplit(uri).scheme.split("+")[0]
    if scheme not in SCHEMES:
        hint = " (write postgresql://)" if scheme == "postgres" else ""
        raise TeamServerError(f"{what} {redact(uri)}: scheme {scheme or 'none'!r} is not supported{hint}; "
                              "use postgresql://USER:PASSWORD@HOST:PORT/DB or sqlite:///FILE")
    return scheme


def check_database(uri: str, timeout_s: int = 5) -> None:
    """Connect once and run ``SELECT 1``: an unreachable database fails here, in one line."""
    import sqlalchemy

    if not uri.startswith("postgresql"):
        return
    try:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": timeout_s},
                                          poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
    except ModuleNotFoundError as exc:
        raise TeamServerError(f"{redact(uri)} needs the {exc.name} driver: pip install 'psycopg[binary]' "
                              "(the project's cluster extra)") from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy wraps every driver failure differently
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise TeamServerError(f"database {redact(uri)} unreachable: {redact_text(reason)}") from None


def check_port(host: str, port: int) -> None:
    """Fails when something listens on ``host:port`` (connections of a server just stopped do not count)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise TeamServerError(f"port {port} on {host} is not free ({exc.strerror}): stop what uses it "
                                  "or pass another --port") from None


# --- a PostgreSQL of its own


def own_postgres(folder: Path, auth: bool) -> tuple[Postgres, str, str | None, str]:
    """Start the PostgreSQL in ``folder``; the URIs of its ``mlflow`` (and ``mlflow_auth``) database, and
    the auth app's secret key, all kept in ``folder/credentials.json``."""
    folder = folder.absolute()
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:  # PostgreSQL runs as the postgres user, which must pass through to data/
        folder.chmod(0o755)  # (credentials.json stays 0600, data/ 0700)
    saved = folder / "credentials.json"
    passwords = json.loads(saved.read_text()) if saved.exists() else {}
    pg = Postgres(folder / "data")
    if pg.initialized() and pg.running():  # left behind by a command that was killed
        log.warning("a PostgreSQL left running in %s is stopped first", pg.data)
        pg.stop("fast")
    try:
        pg.start()
    except PostgresError as exc:
        advice = (" (as root, a folder such as /var/lib/imagepipe-team/postgres: make team-server "
                  "TEAM=/var/lib/imagepipe-team)" if os.geteuid() == 0 and "cannot reach" in str(exc) else "")
        raise TeamServerError(f"{exc}{advice}") from None
    uris = {}
    try:
        for name in ("mlflow", "mlflow_auth") if auth else ("mlflow",):
            passwords.setdefault(name, secrets.token_urlsafe(18))
            uris[name] = pg.database(name, passwords[name])
    except PostgresError:
        pg.stop("fast")
        raise
    passwords.setdefault("flask_secret_key", secrets.token_urlsafe(32))
    descriptor = os.open(saved, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(passwords, handle)
    return pg, uris["mlflow"], uris.get("mlflow_auth"), passwords["flask_secret_key"]


# --- the server


def auth_config(database_uri: str, admin_user: str, cache_s: int) -> Path:
    """MLflow's basic-auth config in a 0600 temporary file (it holds the database password)."""
    descriptor, path = tempfile.mkstemp(prefix="mlflow-auth-", suffix=".ini")
    with os.fdopen(descriptor, "w") as handle:
        handle.write("[mlflow]\ndefault_permission = READ\n"
                     f"database_uri = {database_uri.replace('%', '%%')}\n"
                     f"admin_username = {admin_user}\n"
                     "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                     f"auth_cache_ttl_seconds = {cache_s}\n")
    return Path(path)


def admin_password(args: argparse.Namespace) -> str:
    if args.admin_password_file:
        try:
            password = args.admin_password_file.read_text().strip()
        except OSError as exc:
            raise TeamServerError(f"--admin-password-file {args.admin_password_file}: {exc.strerror}") from None
    else:
        password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD", "")
    if not password:
        raise TeamServerError("--auth needs the admin's password: set MLFLOW_AUTH_ADMIN_PASSWORD or pass "
                              "--admin-password-file")
    if len(password) < 12:
        raise TeamServerError(f"the admin's password has {len(password)} characters: MLflow's basic auth "
                              "takes 12 or more")
    return password


def artifacts_location(destination: str) -> str:
    """A local folder made absolute (and created); a URI (s3://...) as given."""
    if "://" in destination and not destination.startswith("file://"):
        return destination
    folder = Path(destination.removeprefix("file://")).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def start_server(args: argparse.Namespace, backend_uri: str, artifacts: str,
                 auth_env: dict[str, str]) -> subprocess.Popen:
    """``mlflow server`` in its own process group; the URIs go through the environment, not ``ps``."""
    env = {**os.environ, **SERVER_ENV, "MLFLOW_BACKEND_STORE_URI": backend_uri,
           "MLFLOW_ARTIFACTS_DESTINATION": artifacts}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [str(MLFLOW), "server", "--host", args.host, "--port", str(args.port),
               "--workers", str(args.workers), *args.server_args]
    if auth_env:
        env.update(auth_env)
        command += ["--app-name", "basic-auth"]
    return subprocess.Popen(command, env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                            preexec_fn=_end_with_parent if sys.platform == "linux" else None)


def _end_with_parent() -> None:
    """In the server's process, before it starts: SIGTERM when this command dies, even by kill -9
    (Linux's PR_SET_PDEATHSIG), so that no server is left holding the port."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def wait_for_health(process: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise TeamServerError(f"mlflow server exited with code {process.returncode} before answering "
                                  "(its output above says why)")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TeamServerError(f"mlflow server did not answer at {url}/health within {timeout:.0f} s")


def stop_server(process: subprocess.Popen | None, grace_s: float = 20) -> None:
    if process is None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)  # the workers are in its group
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            if sig == signal.SIGTERM:
                os.killpg(process.pid, signal.SIGKILL)  # a worker left behind
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            pass
        return


def client_url(host: str, port: int) -> str:
    shown = socket.getfqdn() if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


def _raise_stop(signum, frame):
    raise _Stop


def check_args(args: argparse.Namespace) -> str | None:
    """Everything that can be checked before anything starts; the admin's password with --auth."""
    if args.workers < 1:
        raise TeamServerError(f"--workers {args.workers}: give 1 or more")
    if args.auth_cache_s < 0:
        raise TeamServerError(f"--auth-cache-s {args.auth_cache_s}: give 0 (no cache) or more seconds")
    if not args.postgres and not args.backend_store_uri:
        raise TeamServerError("no backend store: pass --postgres DIR or --backend-store-uri URI "
                              "(or set MLFLOW_BACKEND_STORE_URI)")
    if args.backend_store_uri:
        check_scheme(args.backend_store_uri, "backend store")
    if args.auth_database_uri:
        check_scheme(args.auth_database_uri, "auth database")
    if args.artifacts_destination.startswith("s3://") and importlib.util.find_spec("boto3") is None:
        raise TeamServerError(f"--artifacts-destination {args.artifacts_destination}: the server needs boto3 "
                              "for S3 (pip install boto3)")
    admin = admin_password(args) if args.auth else None
    check_port(args.host, args.port)
    return admin


def auth_settings(args: argparse.Namespace, backend_uri: str, auth_uri: str | None, admin: str,
                  secret_key: str | None) -> tuple[Path, dict[str, str]]:
    """The basic-auth app's config file and environment."""
    if not auth_uri and backend_uri.startswith("sqlite:///"):
        auth_uri = f"sqlite:///{Path(backend_uri[len('sqlite:///'):]).absolute().parent / 'basic_auth.db'}"
    if not auth_uri:
        raise TeamServerError("--auth with --backend-store-uri needs --auth-database-uri (a second database "
                              "for the users)")
    check_database(auth_uri)
    auth_file = auth_config(auth_uri, args.admin_user, args.auth_cache_s)
    # the key that signs the UI's CSRF tokens: the same in every worker, and across restarts with --postgres
    key = os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or secret_key or secrets.token_urlsafe(32)
    return auth_file, {"MLFLOW_AUTH_CONFIG_PATH": str(auth_file), "MLFLOW_AUTH_ADMIN_USERNAME": args.admin_user,
                       "MLFLOW_AUTH_ADMIN_PASSWORD": admin, "MLFLOW_FLASK_SERVER_SECRET_KEY": key}


def serve(args: argparse.Namespace) -> int:
    """Start everything, wait for a signal (or the server's end), stop everything."""
    pg = process = auth_file = None
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        admin = check_args(args)
        started = time.monotonic()
        backend_uri, auth_uri, secret_key = args.backend_store_uri, args.auth_database_uri, None
        if args.postgres:
            pg, backend_uri, own_auth_uri, secret_key = own_postgres(args.postgres, args.auth)
            auth_uri = auth_uri or own_auth_uri
        check_database(backend_uri)
        auth_env = {}
        if args.auth:
            auth_file, auth_env = auth_settings(args, backend_uri, auth_uri, admin, secret_key)
        artifacts = artifacts_location(args.artifacts_destination)
        log.info("backend store %s, artifacts in %s, %d workers%s", redact(backend_uri), artifacts, args.workers,
                 ", basic auth" if args.auth else "")
        process = start_server(args, backend_uri, artifacts, auth_env)
        local = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        wait_for_health(process, f"http://{local}:{args.port}", args.timeout)
        log.info("team tracking server ready in %.1f s: MLFLOW_TRACKING_URI=%s%s", time.monotonic() - started,
                 client_url(args.host, args.port), " (with user:password@ before the host)" if args.auth else "")
        raise TeamServerError(f"mlflow server exited with code {process.wait()}")
    except _Stop:
        log.info("stopping the team tracking server")
        return 0
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C does not cut the clean-up short
        try:
            stop_server(process)
            if pg:
                pg.stop("fast")
                log.info("PostgreSQL in %s stopped", pg.data)
            if auth_file:
                auth_file.unlink(missing_ok=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return serve(args)
    except (TeamServerError, PostgresError) as exc:
        log.error("team server: %s", exc)
        return 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    raise SystemExit(main())
