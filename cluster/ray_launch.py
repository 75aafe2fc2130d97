"""The processes of one training on a Ray cluster (``python -m cluster.launch
--ray``): a placement group of one bundle per process, one task per bundle
running the command with its variables (:mod:`cluster.jobs`), their output
streamed to the launcher, and a failing process failing the launch."""

from __future__ import annotations

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

from cluster.jobs import LaunchError, address, from_placement, process_env

log = logging.getLogger("cluster.launch")

TAIL_LINES = 30
STOP_S = 40  # for a stopped process to unwind (SIGTERM, 20 s, then SIGKILL) before its worker is killed

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
                 address(ips[0], port), workdir)
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
