"""benchmarks/hostinfo.py: what a benchmark records about its machine."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from hostinfo import VECTOR_FLAGS, host  # noqa: E402


def test_host_names_the_cpu_and_only_the_vector_flags_it_has():
    info = host()
    assert info["cores"] >= 1 and info["python"].count(".") == 2 and len(info["date"]) == 10
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        flags = set(next((line for line in lines if line.startswith("flags")), "flags:").split(":", 1)[1].split())
    assert info["vector"] == [flag for flag in VECTOR_FLAGS if flag in flags]
    if cpuinfo.exists():
        assert info["cpu"] != "unknown"


def test_gpus_are_listed_only_where_nvidia_smi_answers(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA H200, 580.159.04, 143771 MiB'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert host()["gpus"] == ["NVIDIA H200, 580.159.04, 143771 MiB"]
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert host()["gpus"] == []
