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

The variables are worked out in :mod:`cluster.jobs`, the Ray side is
:mod:`cluster.ray_launch`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Sequence

from cluster.jobs import DEFAULT_PORT, PORT, Job, LaunchError, from_skypilot, port_from, process_env

log = logging.getLogger("cluster.launch")


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

        from cluster.ray_launch import launch_on_ray

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
