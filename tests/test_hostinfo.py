"""benchmarks/harness.py: what a benchmark records about its machine."""

from pathlib import Path

from benchmarks.harness import VECTOR_FLAGS, host, machine


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


def test_machine_adds_installed_versions_and_the_keras_backend_of_a_fresh_interpreter():
    import importlib.metadata

    info = machine("numpy", "no-such-package")
    assert info["numpy"] == importlib.metadata.version("numpy") and info["no-such-package"] is None
    assert info["keras"] == importlib.metadata.version("keras") and info[info["backend"]]
    assert info["accelerator"] and info["cpu"] == host()["cpu"]
    assert "keras" not in machine(keras=False)
