"""Where and from what a result was made: the git commit, the input data's
DVC hashes, the machine, the backend and the versions that decide its numbers.
Recorded in each trained model's ``run.json`` (and from there in the metrics
files and the report) and as MLflow tags."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path

import yaml

# the commit a copy of the source tree came from, set by whoever made the copy
# (the offline GPU kit): such a copy has no .git to ask, or one that is not the source's
SOURCE_COMMIT = "IMAGEPIPE_SOURCE_COMMIT"


def params_hash(tree: dict) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_state(root: Path = Path(".")) -> dict[str, str]:
    """``git_commit`` and ``git_dirty`` (tracked files changed) of the working tree."""
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


def file_md5(path: Path | str) -> str:
    """A file's md5, read 1 MiB at a time: what DVC records for a binary file."""
    digest = hashlib.md5()
    with open(path, "rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
