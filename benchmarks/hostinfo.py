"""The machine a benchmark ran on, for its results: CPU model, cores, Python, date."""

from __future__ import annotations

import os
import platform
from datetime import date


def host() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "date": date.today().isoformat()}
