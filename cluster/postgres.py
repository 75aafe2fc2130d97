"""A PostgreSQL server of its own: a database cluster in one folder, on
127.0.0.1, for the team tracking server (:mod:`cluster.team_server`), the
tests and the CI smoke.

It uses the PostgreSQL programs of the machine (Debian's ``postgresql``
package: ``/usr/lib/postgresql/<version>/bin``; ``PG_BIN`` names another
folder). PostgreSQL refuses to run as root, so as root every server program
runs as the ``postgres`` system user that the package creates, and the data
folder is handed to it: the folder's parents must let that user through (a
clear error says so when they do not; a folder under ``/tmp`` or ``/var/tmp``
does).

The cluster takes connections over TCP on 127.0.0.1 only, with a password
(SCRAM), and over a Unix socket inside its data folder (no password: only
the owner of the folder reaches it). :meth:`Postgres.database` creates a
database and a role that owns it, and gives its SQLAlchemy URI.

    pg = Postgres(Path("/var/tmp/team-pg")).start()
    uri = pg.database("mlflow")        # postgresql://mlflow:...@127.0.0.1:PORT/mlflow
    ...
    pg.stop()
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger("cluster.postgres")

SYSTEM_USER = "postgres"


class PostgresError(RuntimeError):
    """PostgreSQL could not be set up or started; the message says why."""


def bin_dir() -> Path:
    """The folder of ``initdb``, ``pg_ctl`` and ``psql``: ``PG_BIN``, else the
    newest ``/usr/lib/postgresql/<version>/bin``, else the one on ``PATH``."""
    if os.environ.get("PG_BIN"):
        found = Path(os.environ["PG_BIN"])
        if not (found / "pg_ctl").exists():
            raise PostgresError(f"PG_BIN={found}: no pg_ctl there")
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if versions:
        return versions[-1].parent
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    raise PostgresError("PostgreSQL's programs (initdb, pg_ctl) not found: install Debian's postgresql package "
                        "(apt-get install postgresql) or set PG_BIN to their folder")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Postgres:
    """A database cluster in ``data`` (created on first start), served on
    127.0.0.1:``port`` (a free one by default, kept across restarts)."""

    def __init__(self, data: Path, port: int | None = None):
        self.data = Path(data).absolute()
        self.port = port or free_port()
        self.bin = bin_dir()
        self.as_root = os.geteuid() == 0

    # --- programs, as the right user

    def _command(self, program: str, *args: str) -> list[str]:
        command = [str(self.bin / program), *args]
        return ["runuser", "-u", SYSTEM_USER, "--", *command] if self.as_root else command

    def _run(self, program: str, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(self._command(program, *args), capture_output=True, text=True, timeout=timeout,
                              cwd="/")
        if done.returncode != 0:
            raise PostgresError(f"{program} {' '.join(args)} failed (exit {done.returncode}): "
                                f"{(done.stderr or done.stdout).strip()[-1500:]}")
        return done.stdout

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run ``statement`` as the superuser over the cluster's Unix socket; its output."""
        return self._run("psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-h", str(self.data),
                         "-p", str(self.port), "-U", SYSTEM_USER, "-d", database, "-c", statement)

    # --- life

    @property
    def log_file(self) -> Path:
        return self.data / "server.log"

    def _prepare_folder(self) -> None:
        if self.as_root:
            import pwd

            try:
                pwd.getpwnam(SYSTEM_USER)
            except KeyError:
                raise PostgresError(f"running as root, PostgreSQL needs the system user {SYSTEM_USER!r} "
                                    "(Debian's postgresql package creates it)") from None
        self.data.mkdir(parents=True, exist_ok=True)
        if self.as_root:
            shutil.chown(self.data, SYSTEM_USER, SYSTEM_USER)
            self.data.chmod(0o700)
            probe = subprocess.run(["runuser", "-u", SYSTEM_USER, "--", "test", "-w", str(self.data)], cwd="/")
            if probe.returncode != 0:
                raise PostgresError(f"{self.data}: PostgreSQL runs as user {SYSTEM_USER!r} (it refuses root), "
                                    "which cannot reach this folder: every parent folder must let others "
                                    "through (chmod o+x), as /tmp and /var/tmp do")

    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def start(self, timeout: float = 60) -> "Postgres":
        """Create the cluster if ``data`` holds none, then start it and wait until it takes connections."""
        self._prepare_folder()
        if not self.initialized():
            self._run("initdb", "-D", str(self.data), "-U", SYSTEM_USER, "--auth-local=trust",
                      "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8")
            log.info("created a PostgreSQL cluster in %s", self.data)
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='{self.data}'"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_file), "-o", options, "-w",
                  "-t", str(int(timeout)), "start", timeout=timeout + 30)
        log.info("PostgreSQL on 127.0.0.1:%d (data %s)", self.port, self.data)
        return self

    def running(self) -> bool:
        done = subprocess.run(self._command("pg_ctl", "-D", str(self.data), "status"), capture_output=True, cwd="/")
        return done.returncode == 0

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: end the sessions; ``immediate``: as a
        crash would, recovered at the next start)."""
        if self.initialized() and self.running():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "immediate", down_s: float = 0.0) -> None:
        """Stop (by default as a crash would), stay down ``down_s`` seconds, start again on the same port."""
        self.stop(mode)
        time.sleep(down_s)
        self.start()

    def remove(self) -> None:
        """Stop the server and delete its data folder."""
        self.stop("immediate")
        shutil.rmtree(self.data, ignore_errors=True)

    # --- databases

    def database(self, name: str, password: str | None = None) -> str:
        """Create database ``name`` and a role of the same name that owns it
        (both kept if they exist; the password is then changed to
        ``password``, a new random one by default); its SQLAlchemy URI."""
        if not name.isidentifier() or name.lower() != name:
            raise PostgresError(f"database name {name!r}: use lower-case letters, digits and _")
        password = password or secrets.token_urlsafe(18)
        exists = self.sql(f"SELECT 1 FROM pg_roles WHERE rolname = '{name}'").strip()
        verb = "ALTER" if exists else "CREATE"
        self.sql(f"{verb} ROLE {name} LOGIN PASSWORD '{password}'")
        if not self.sql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip():
            self.sql(f"CREATE DATABASE {name} OWNER {name}")
        return f"postgresql://{name}:{password}@127.0.0.1:{self.port}/{name}"
