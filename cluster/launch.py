"""Launch one training over several hosts, one JAX process on each.

A data-parallel training (``training.distribution: data_parallel``) joins
its processes through three variables (:mod:`stages.distribution`):
``KERAS_DISTRIBUTION_JOB_ADDRESSES`` (process 0's host and a port),
``KERAS_DISTRIBUTION_NUM_PROCESSES`` and ``KERAS_DISTRIBUTION_PROCESS_ID``.
This module works them out from where the processes were placed and runs
the command with them set (and ``KERAS_BACKEND=jax``):

* under SkyPilot, from ``SKYPILOT_NODE_RANK`` and ``SKYPILOT_NODE_IPS``
  (process 0 is the first IP); the launcher then becomes the command::

      python -m cluster.launch -- python -m stages.train mnist_cae

* on a Ray cluster, from a placement group of one bundle per process (bundle
  i on its own node, ``STRICT_SPREAD``; ``--pack`` lets them share one
  machine): process i runs in bundle i, process 0's node is the coordinator,
  at a port free there. The launcher waits for every process and fails,
  naming the process and its node, if any fails::

      python -m cluster.launch --ray --address auto --nodes 2 --gpus 1 -- \\
          python -m stages.train mnist_cae

Every process runs in the same folder path (``--workdir``, by default the
launcher's own): on each host a checkout of the same commit with its data
(``dvc pull``), or one shared folder. Only process 0 writes.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger("cluster.launch")

PORT = "IMAGEPIPE_COORDINATOR_PORT"
DEFAULT_PORT = 8476
TAIL_LINES = 30
STOP_S = 40  # for a stopped process to unwind (SIGTERM, 20 s, then SIGKILL) before its worker is killed


class LaunchError(Exception):
    """The processes cannot be placed or launched; the message names the value at fault."""


@dataclass(frozen=True)
class Job:
    """One process of a training over ``processes`` processes: this one is
    ``index``; ``coordinator`` is process 0's ``host:port``."""

    coordinator: str
    processes: int
    index: int

    def env(self) -> dict[str, str]:
        """The variables that make ``keras.distribution.initialize()`` join this job (on JAX)."""
        return {"KERAS_BACKEND": "jax", "KERAS_DISTRIBUTION_JOB_ADDRESSES": self.coordinator,
                "KERAS_DISTRIBUTION_NUM_PROCESSES": str(self.processes),
                "KERAS_DISTRIBUTION_PROCESS_ID": str(self.index)}


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def port_from(option: int | None, env: Mapping[str, str]) -> int:
    """The coordinator's port: ``--port``, else ``IMAGEPIPE_COORDINATOR_PORT``, else 8476."""
    source, raw = ("--port", str(option)) if option is not None else (PORT, env.get(PORT, str(DEFAULT_PORT)))
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise LaunchError(f"{source}={raw!r}: expected a port number from 1 to 65535")
    return int(raw)


def from_skypilot(env: Mapping[str, str], port: int) -> Job:
    """This node's process under SkyPilot: rank ``SKYPILOT_NODE_RANK`` of the
    nodes in ``SKYPILOT_NODE_IPS`` (one a line, the head first), which must
    number ``SKYPILOT_NUM_NODES`` where that is set."""
    ips = [line.strip() for line in env.get("SKYPILOT_NODE_IPS", "").splitlines() if line.strip()]
    if not ips:
        raise LaunchError(f"SKYPILOT_NODE_IPS={env.get('SKYPILOT_NODE_IPS', '')!r}: no node IPs (one a line); "
                          "run under SkyPilot (num_nodes in the task), or use --ray")
    count = env.get("SKYPILOT_NUM_NODES")
    if count is not None and count.strip() != str(len(ips)):
        raise LaunchError(f"SKYPILOT_NUM_NODES={count!r} but SKYPILOT_NODE_IPS lists {len(ips)} node(s) "
                          f"({', '.join(ips)})")
    rank = env.get("SKYPILOT_NODE_RANK", "")
    if not rank.strip().isdigit() or int(rank) >= len(ips):
        raise LaunchError(f"SKYPILOT_NODE_RANK={rank!r}: expected a whole number from 0 to {len(ips) - 1} "
                          f"(SKYPILOT_NODE_IPS lists {len(ips)} node(s))")
    return Job(_address(ips[0], port), len(ips), int(rank))


def from_placement(node_ips: Sequence[str], index: int, port: int) -> Job:
    """Process ``index`` of a Ray placement group whose bundle i sits on
    ``node_ips[i]``; process 0's node, at ``port``, is the coordinator."""
    empty = [i for i, ip in enumerate(node_ips) if not ip or not ip.strip()]
    if not node_ips or empty:
        raise LaunchError(f"placement node IPs {list(node_ips)!r}: "
                          + (f"bundle {empty[0]} has no node IP" if empty else "no bundles"))
    if not 0 <= index < len(node_ips):
        raise LaunchError(f"bundle index {index}: expected 0 to {len(node_ips) - 1} "
                          f"(the placement group has {len(node_ips)} bundle(s))")
    return Job(_address(node_ips[0].strip(), port), len(node_ips), index)


def process_env(base: Mapping[str, str], job: Job) -> dict[str, str]:
    """``base`` with ``job``'s variables; a backend other than JAX in ``base`` is refused."""
    backend = base.get("KERAS_BACKEND", "jax")
    if backend != "jax":
        raise LaunchError(f"KERAS_BACKEND={backend!r}: a training over several hosts runs on JAX only "
                          "(set KERAS_BACKEND=jax, or unset it)")
    return {**base, **job.env()}


# ---- on a Ray cluster -----------------------------------------------------------------------------------

def _probe(workdir: str) -> tuple[str, int, bool]:
    """In a bundle: its node's IP, a port free there now, whether ``workdir`` exists there."""
    import ray

    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return ray.util.get_node_ip_address(), port, os.path.isdir(workdir)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the command's process group (a training unwinds: its MLflow run ends KILLED), then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait_s)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def _process(command: list[str], variables: dict[str, str], workdir: str, index: int) -> dict:
    """In bundle ``index``: run the command, its output passed on line by line
    (Ray shows it at the launcher); its exit code and last lines."""
    import ray

    # Ray cancels a running task with a simulated SIGINT, lost where SIGINT is ignored (a launcher or
    # cluster started in the background by a shell): restore Python's own handler for this task
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    started, tail = time.monotonic(), collections.deque(maxlen=TAIL_LINES)
    process = subprocess.Popen(command, cwd=workdir, env={**os.environ, **variables}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)

    def relay():
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        code = None
        while code is None:  # short waits: Ray's cancel (a KeyboardInterrupt here) gets through between them
            try:
                code = process.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        reader.join(timeout=5)
    finally:  # cancelled by the launcher (another process failed): the command stops too
        if process.poll() is None:
            _stop(process)
    return {"index": index, "node": ray.util.get_node_ip_address(), "code": code, "tail": list(tail),
            "seconds": round(time.monotonic() - started, 1)}


def launch_on_ray(command: Sequence[str], nodes: int, *, cpus: float = 1, gpus: float = 0, pack: bool = False,
                  workdir: str, env: Mapping[str, str], wait_s: float = 300, grace_s: float = 60) -> list[dict]:
    """Run ``command`` as ``nodes`` processes of one job on the connected Ray
    cluster; each process's outcome (index, node, exit code, last lines,
    seconds; code None if the launcher stopped it). Raises LaunchError if
    the processes cannot be placed or a process fails."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if nodes < 1:
        raise LaunchError(f"--nodes {nodes}: expected 1 or more")
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    strategy = "PACK" if pack else "STRICT_SPREAD"
    group = placement_group([bundle] * nodes, strategy=strategy)
    try:
        ready, _ = ray.wait([group.ready()], timeout=wait_s)
        if not ready:
            alive = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
            raise LaunchError(
                f"--nodes {nodes}: the cluster could not place {nodes} bundle(s) of {_amount(bundle)} "
                f"({strategy}{': each on its own node' if not pack else ''}) within {wait_s:g} s; it has "
                f"{len(alive)} node(s) alive ({', '.join(alive)}) with {_amount(ray.cluster_resources())} in all; "
                "use fewer --nodes or --cpus/--gpus, or --pack on one machine")

        def in_bundle(i: int, **resources) -> dict:
            return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
                    **resources}

        probe = ray.remote(_probe)
        probes = ray.get([probe.options(**in_bundle(i, num_cpus=0)).remote(workdir) for i in range(nodes)])
        missing = [f"process {i} on {ip}" for i, (ip, _, there) in enumerate(probes) if not there]
        if missing:
            raise LaunchError(f"--workdir {workdir}: no such folder for {', '.join(missing)}; every host needs "
                              "the project at the same path (a checkout of the same commit with dvc pull, or "
                              "one shared folder)")
        ips, port = [ip for ip, _, _ in probes], probes[0][1]
        log.info("launching %d process(es) on %s; process 0 at %s, in %s", nodes, ", ".join(ips),
                 _address(ips[0], port), workdir)
        run = ray.remote(_process)
        tasks = {}
        for i in range(nodes):
            variables = process_env(env, from_placement(ips, i, port))
            tasks[run.options(**in_bundle(i, num_cpus=cpus, num_gpus=gpus), name=f"process {i}").remote(
                list(command), variables, workdir, i)] = i
        try:
            return _collect(tasks, ips, grace_s)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM at the launcher: the commands stop too, not orphaned
            log.warning("interrupted: stopping the %d process(es)", nodes)
            for ref in tasks:
                ray.cancel(ref)
            ray.wait(list(tasks), num_returns=len(tasks), timeout=STOP_S)
            raise
    finally:
        remove_placement_group(group)


def _collect(tasks: dict, ips: list[str], grace_s: float) -> list[dict]:
    """Wait for every process; after the first failure, the others get
    ``grace_s`` to end (they fail at their next collective), then are stopped."""
    import ray

    outcomes, pending = {}, list(tasks)
    failed_at = stopping_at = None
    while pending:
        deadline = stopping_at + STOP_S if stopping_at else failed_at + grace_s if failed_at else None
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
        for ref in done:
            outcome = _outcome(ref, tasks[ref], ips)
            outcomes[outcome["index"]] = outcome
            log.info("process %d on %s: %s", outcome["index"], outcome["node"], _said(outcome))
            if outcome["code"] != 0 and failed_at is None:
                failed_at, first = time.monotonic(), outcome
        if done or not pending:
            continue
        if stopping_at is None:
            log.warning("stopping process(es) %s: still running %g s after the first failure",
                        ", ".join(str(tasks[ref]) for ref in pending), grace_s)
            for ref in pending:
                ray.cancel(ref)
            stopping_at = time.monotonic()
        else:  # they did not stop in time: their workers are killed
            for ref in pending:
                ray.cancel(ref, force=True)
                outcomes[tasks[ref]] = {"index": tasks[ref], "node": ips[tasks[ref]], "code": None, "tail": [],
                                        "seconds": None}
            pending = []
    results = [outcomes[i] for i in sorted(outcomes)]
    failures = [o for o in results if o["code"] != 0]
    if failures:
        tail = "\n".join(f"  {line}" for line in first["tail"][-TAIL_LINES:])
        raise LaunchError(f"process {first['index']} on {first['node']} failed ({_said(first)})"
                          + "".join(f"; process {o['index']} on {o['node']}: {_said(o)}" for o in failures
                                    if o is not first)
                          + (f"\nits last lines:\n{tail}" if tail else ""))
    return results


def _outcome(ref, index: int, ips: list[str]) -> dict:
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.TaskCancelledError:
        return {"index": index, "node": ips[index], "code": None, "tail": [], "seconds": None}
    except ray.exceptions.RayError as error:  # its worker or node died
        return {"index": index, "node": ips[index], "code": None, "tail": str(error).splitlines()[-TAIL_LINES:],
                "seconds": None, "lost": True}


def _amount(resources: Mapping[str, float]) -> str:
    return " + ".join(f"{resources[kind]:g} {kind}" for kind in ("CPU", "GPU") if resources.get(kind)) or "nothing"


def _said(outcome: dict) -> str:
    if outcome.get("lost"):
        return "lost (its worker or node died)"
    if outcome["code"] is None:
        return "stopped by the launcher"
    return f"exit code {outcome['code']} after {outcome['seconds']} s"


# ---- the command line -----------------------------------------------------------------------------------

def _forwarded(names: Sequence[str]) -> dict[str, str]:
    """``--env NAME=VALUE`` as given, ``--env NAME`` with the launcher's value."""
    chosen = {}
    for item in names:
        name, sep, value = item.partition("=")
        if not name:
            raise LaunchError(f"--env {item!r}: expected NAME or NAME=VALUE")
        if not sep and name not in os.environ:
            raise LaunchError(f"--env {name}: not set here; give NAME=VALUE")
        chosen[name] = value if sep else os.environ[name]
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.launch", description=__doc__.split("\n\n")[0],
                                     epilog="The command follows '--'.")
    parser.add_argument("--port", type=int, help=f"process 0's port under SkyPilot (default: ${PORT}, else "
                                                 f"{DEFAULT_PORT}); on Ray, a port free on process 0's node")
    ray_args = parser.add_argument_group("on a Ray cluster")
    ray_args.add_argument("--ray", action="store_true", help="place the processes on a Ray cluster")
    ray_args.add_argument("--address", help="the cluster (auto, host:port, ray://host:10001, local; "
                                            "default: $RAY_ADDRESS, else the one started here, else a new one)")
    ray_args.add_argument("--nodes", type=int, help="how many processes, one a node")
    ray_args.add_argument("--cpus", type=float, default=1, help="CPUs reserved for each process (default 1)")
    ray_args.add_argument("--gpus", type=float, default=0, help="GPUs reserved for each process (default 0)")
    ray_args.add_argument("--pack", action="store_true", help="let processes share a node (PACK, for one "
                                                              "machine) instead of one a node (STRICT_SPREAD)")
    ray_args.add_argument("--workdir", default=os.getcwd(), help="the project folder, the same path on every "
                                                                 "node (default: this folder)")
    ray_args.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                          help="a variable for every process (NAME alone: its value here); repeatable")
    ray_args.add_argument("--wait", type=float, default=300, help="seconds to wait for the placement (default 300)")
    ray_args.add_argument("--grace", type=float, default=60, help="seconds the other processes get to end after "
                                                                  "one fails, before they are stopped (default 60)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command each process runs, after '--'")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: give it after '--' (python -m cluster.launch -- python -m stages.train NAME)")
    if args.ray and (args.nodes or 0) < 1:
        parser.error(f"--ray needs --nodes N, 1 or more (got {args.nodes})")
    if args.cpus < 0 or args.gpus < 0 or not args.cpus and not args.gpus:
        parser.error(f"--cpus {args.cpus:g} --gpus {args.gpus:g}: each process needs some CPUs or GPUs, none negative")
    from stages.cli import setup_logging

    setup_logging()
    try:
        if not args.ray:
            return _exec_under_skypilot(command, args.port)
        import ray

        env = _forwarded(args.env)
        process_env({**os.environ, **env}, Job("", 1, 0))  # a backend other than JAX stops here, before Ray
        ray.init(address=args.address, logging_level=logging.WARNING)
        signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which sets its own
        try:
            results = launch_on_ray(command, args.nodes, cpus=args.cpus, gpus=args.gpus, pack=args.pack,
                                    workdir=os.path.abspath(args.workdir), env=env, wait_s=args.wait,
                                    grace_s=args.grace)
        finally:
            ray.shutdown()
        log.info("all %d process(es) done in %s s", len(results), max(o["seconds"] for o in results))
        return 0
    except LaunchError as error:
        log.error("%s", error)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


def _interrupt(signum, frame):
    raise KeyboardInterrupt()


def _exec_under_skypilot(command: list[str], port: int | None) -> int:
    if "SKYPILOT_NODE_IPS" not in os.environ and "SKYPILOT_NODE_RANK" not in os.environ:
        raise LaunchError("SKYPILOT_NODE_RANK and SKYPILOT_NODE_IPS are not set: run this in a SkyPilot task's "
                          "run section, or use --ray --nodes N")
    job = from_skypilot(os.environ, port_from(port, os.environ))
    env = process_env(os.environ, job)
    log.info("process %d of %d, process 0 at %s: %s", job.index, job.processes, job.coordinator, " ".join(command))
    try:
        os.execvpe(command[0], command, env)
    except OSError as error:
        raise LaunchError(f"command {command[0]!r}: {error.strerror}") from error
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
