"""The three variables that join one process to a training over several
hosts (:mod:`stages.distribution`), worked out from where the processes were
placed: SkyPilot's node rank and IPs, or a Ray placement group's bundles.
Pure functions, used by :mod:`cluster.launch` and :mod:`cluster.ray_launch`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PORT = "IMAGEPIPE_COORDINATOR_PORT"
DEFAULT_PORT = 8476


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


def address(host: str, port: int) -> str:
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
    return Job(address(ips[0], port), len(ips), int(rank))


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
    return Job(address(node_ips[0].strip(), port), len(node_ips), index)


def process_env(base: Mapping[str, str], job: Job) -> dict[str, str]:
    """``base`` with ``job``'s variables; a backend other than JAX in ``base`` is refused."""
    backend = base.get("KERAS_BACKEND", "jax")
    if backend != "jax":
        raise LaunchError(f"KERAS_BACKEND={backend!r}: a training over several hosts runs on JAX only "
                          "(set KERAS_BACKEND=jax, or unset it)")
    return {**base, **job.env()}
