"""The machine a benchmark ran on, for its results: CPU model, vector
instructions, cores, GPUs (as nvidia-smi names them), Python, date."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import date

# the CPU features that decide how fast the convolutions run: AVX-512 and its
# bf16 dot products make bf16 mixed precision pay on a CPU (AMX even more);
# hosts of the same "AMD EPYC" name differ in them
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def host() -> dict:
    cpu, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name") and cpu == "unknown":
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": cpu, "vector": [flag for flag in VECTOR_FLAGS if flag in flags], "cores": os.cpu_count(),
            "gpus": gpus(), "python": platform.python_version(), "date": date.today().isoformat()}


def gpus() -> list[str]:
    """Each NVIDIA GPU's name, driver and memory; none without nvidia-smi."""
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                 "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in listed.stdout.splitlines() if line.strip()] if listed.returncode == 0 else []
