"""A real multi-node Ray cluster on 127.0.0.1 for tests.

Each node is its own ``ray start --block`` process in its own session: the
head (GCS only, no CPUs, so no task ever runs where killing it would end the
cluster) and worker nodes with one CPU and a custom resource naming each.
Killing a node SIGKILLs its whole process tree at once (the raylet, its
workers and whatever they started), as a machine that dies would lose them.

The cluster keeps to itself: its own temp dir (Ray records the cluster's
address there, not in /tmp/ray, so ``ray.init()`` elsewhere does not find
it), its own ports and its own auth token in the environment it hands out
(never ``~/.ray/auth_token``). A dead node is noticed within about 3 s (Ray's
health check every 0.5 s, failing after 3 misses) instead of Ray's 15 s.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from cluster.postgres import free_port

RAY = Path(sys.executable).with_name("ray")
# a dead node is declared dead after ~3 failed checks 0.5 s apart (Ray's default: 5 x 3 s)
FAST_HEALTH_CHECK = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "1000",
                     "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "500"}


class RayCluster:
    """``start()`` a head and ``workers`` nodes; ``env`` is what a driver needs to join."""

    def __init__(self, workers: int = 2, object_store_bytes: int = 80 * 1024 * 1024, env: dict | None = None):
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths have a limit
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.workers, self.object_store_bytes = workers, object_store_bytes
        self.nodes: dict[str, subprocess.Popen] = {}
        self.env = {**(env or os.environ), **FAST_HEALTH_CHECK, "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_ADDRESS": self.address}
        self.env.pop("RAY_AUTH_TOKEN_PATH", None)

    def _start_node(self, name: str, *args: str, timeout: float) -> None:
        """Start node ``name`` and wait until ``ray start`` says it runs (one node at a time: on two
        cores, nodes joining together time out)."""
        log_path = self.temp_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            self.nodes[name] = process = subprocess.Popen(
                [str(RAY), "start", *args, "--block", "--object-store-memory", str(self.object_store_bytes),
                 "--disable-usage-stats"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in log_path.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ray node {name} did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    def start(self, timeout: float = 120) -> "RayCluster":
        self._start_node("head", "--head", "--port", str(self.port), "--num-cpus", "0", "--temp-dir",
                         str(self.temp_dir), "--include-dashboard=false", "--dashboard-port", str(free_port()),
                         "--ray-client-server-port", str(free_port()), timeout=timeout)
        for index in range(1, self.workers + 1):
            self.add_node(f"node{index}", timeout)
        return self

    def add_node(self, name: str, timeout: float = 120) -> None:
        """A worker node with one CPU and the resource ``name`` (so tests can tell the nodes apart)."""
        self._start_node(name, "--address", self.address, "--num-cpus", "1", "--resources", json.dumps({name: 1}),
                         timeout=timeout)

    def ensure_workers(self) -> None:
        """Start again any worker node that is not running (a test killed it)."""
        for name, process in list(self.nodes.items()):
            if name != "head" and process.poll() is not None:
                self.add_node(name)

    def node_ids(self) -> dict[str, str]:
        """{node name: Ray node id} of the nodes whose raylet runs, read from its command line."""
        found = {}
        for name in self.nodes:
            for process in self.processes(name):
                try:
                    ids = [arg.split("=", 1)[1] for arg in process.cmdline() if arg.startswith("--node_id=")]
                except psutil.Error:
                    continue
                if ids and process.name() == "raylet":
                    found[name] = ids[0]
        return found

    def processes(self, name: str) -> list[psutil.Process]:
        """The node's ``ray start`` process and every process under it."""
        try:
            root = psutil.Process(self.nodes[name].pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def node_running(self, pattern: str) -> str | None:
        """The worker node whose process tree has a process whose command line holds ``pattern``."""
        for name in self.nodes:
            for process in self.processes(name):
                try:
                    if pattern in " ".join(process.cmdline()):
                        return name
                except psutil.Error:
                    continue
        return None

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's whole process tree at once, as a machine that dies."""
        tree = self.processes(name)
        for process in tree:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(tree, timeout=30)
        self.nodes[name].wait(timeout=30)

    def stop(self) -> None:
        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            if name in self.nodes:
                self.kill_node(name)
                try:  # anything that left the tree but kept the node's session
                    os.killpg(self.nodes[name].pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
