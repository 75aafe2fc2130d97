"""One experiment of a sweep (:mod:`cluster.sweep`), as a Ray task on a node.

It clones the project at the submitted commit into a temporary folder, runs
``dvc exp run --pull`` with the point's ``-S`` overrides, pushes the result
(``dvc exp push``, ``dvc push``) and deletes the clone. Each command runs in
its own process group, watched by a small guard process that kills the group
when the command ends or when the Ray worker running the task dies: a
training never outlives its task to compete with the task's retry.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Kills the process group named on its command line once its stdin closes: when the step ends, or when the
# Ray worker that started it dies, so no training outlives its task and competes with the task's retry.
GUARD = ("import os, signal, sys\nsys.stdin.read()\ntry:\n    os.killpg(int(sys.argv[1]), signal.SIGKILL)\n"
         "except OSError:\n    pass\n")
STAGE_ERROR = re.compile(r"^\d\d:\d\d:\d\d ERROR [\w.]+: (.+)$")  # stages.cli's format
EXCEPTION = re.compile(r"^[\w.]*(Error|Exception|Interrupt): .+")


class ExperimentFailed(RuntimeError):
    """An experiment's command failed: its one-line error, the node and the output's last lines."""

    def __init__(self, line: str, node: str = "", tail: str = ""):
        super().__init__(line, node, tail)
        self.line, self.node, self.tail = line, node, tail

    def __str__(self) -> str:
        return self.line


def dvc_command() -> str:
    return shutil.which("dvc", path=os.path.dirname(sys.executable)) or shutil.which("dvc") or "dvc"


def one_line_error(output: str) -> str:
    """The line that says why: a stage's ERROR line, an exception, DVC's ERROR, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if match := STAGE_ERROR.match(line):
            return match.group(1)
    for pattern in (EXCEPTION, re.compile(r"^ERROR: (.+)")):
        found = [line for line in lines if pattern.match(line)]
        if found:
            return found[-1].removeprefix("ERROR: ")
    return lines[-1] if lines else "no output"


def _step(label: str, cmd: list[str], cwd: Path, env: dict, log_path: Path, node: str) -> None:
    """Run one command in its own process group, guarded (see GUARD); ExperimentFailed when it fails."""
    with open(log_path, "w") as out:
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        guard = subprocess.Popen([sys.executable, "-c", GUARD, str(process.pid)], stdin=subprocess.PIPE,
                                 start_new_session=True)
        try:
            code = process.wait()
        finally:
            guard.stdin.close()
            guard.wait()
    if code != 0:
        output = log_path.read_text(errors="replace")
        raise ExperimentFailed(f"{label}: {one_line_error(output)}", node, "\n".join(output.splitlines()[-40:]))


def run_experiment(spec: dict) -> dict:
    """The Ray task: clone, ``dvc exp run``, push (see the module's docstring); where it ran and how long."""
    import ray

    started, node = time.monotonic(), ray.get_runtime_context().get_node_id()
    dvc, name, targets = dvc_command(), spec["name"], spec["targets"]
    bin_dir = os.path.dirname(sys.executable)  # the stages' `python` is this environment's
    env = {**os.environ, **spec["env"], "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    base = Path(tempfile.mkdtemp(prefix=f"sweep-{name}-", dir=spec["workdir"]))
    clone = base / "repo"
    overrides = [arg for override in spec["overrides"] for arg in ("-S", override)]
    steps = [("git clone", ["git", "clone", "--quiet", "--no-checkout", spec["repo"], str(clone)], base),
             ("git checkout", ["git", "checkout", "--quiet", "--detach", spec["commit"]], clone),
             ("dvc remote", [dvc, "remote", "modify", "--local", spec["dvc_remote"], "url", spec["dvc_url"]], clone),
             ("dvc exp run", [dvc, "exp", "run", "--pull", "-n", name, *overrides, *targets], clone),
             ("dvc exp push", [dvc, "exp", "push", "origin", name], clone),
             ("dvc push", [dvc, "push", *(["--with-deps", *targets] if targets else [])], clone)]
    try:
        for label, cmd, cwd in steps:
            _step(label, cmd, cwd, env, base / "output.log", node)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {"node": node, "host": ray.util.get_node_ip_address(), "seconds": round(time.monotonic() - started, 1)}
