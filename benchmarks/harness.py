"""What every benchmark shares: the machine a result was measured on, the
results files, the experiments (read from params.yaml), the stages' commands
and outputs (read from dvc.yaml), the data mirror, and the scratch projects
and child processes the stages run in.

The experiment lists come from params.yaml rather than being spelt here:
:func:`seed_experiments` are the seed questions' experiments, :func:`data_needs`
the datasets and corruptions some experiments read.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any, NamedTuple

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PARAMS_FILE = ROOT / "params.yaml"

# --- the machine --------------------------------------------------------------

# the CPU features that decide how fast the convolutions run: AVX-512 and its
# bf16 dot products make bf16 mixed precision pay on a CPU (AMX even more);
# hosts of the same "AMD EPYC" name differ in them
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def vector_flags() -> list[str]:
    """The ``VECTOR_FLAGS`` this CPU has (none where /proc/cpuinfo is not there)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((set(line.split(":", 1)[1].split()) for line in info if line.startswith("flags")), set())
    except OSError:
        flags = set()
    return [flag for flag in VECTOR_FLAGS if flag in flags]


def gpus() -> list[str]:
    """Each NVIDIA GPU's name, driver and memory; none without nvidia-smi."""
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                 "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in listed.stdout.splitlines() if line.strip()] if listed.returncode == 0 else []


def host() -> dict:
    """The machine without its Python packages: CPU model (as the stages tag
    their runs with it), vector instructions, cores, GPUs, Python, date."""
    from stages.provenance import cpu_model

    return {"cpu": cpu_model(), "vector": vector_flags(), "cores": os.cpu_count(), "gpus": gpus(),
            "python": platform.python_version(), "date": date.today().isoformat()}


def backend() -> dict:
    """Keras, its backend and the backend's version, and the accelerator it
    trains on, from the environment the stages record for their runs
    (``stages.provenance.environment``). It imports Keras and lists the devices,
    so it runs in a fresh interpreter: the benchmark's own process neither
    loads the backend nor claims an accelerator's memory."""
    code = "import json; from stages.provenance import environment; print(json.dumps(environment()))"
    found = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if found.returncode != 0:
        raise RuntimeError(f"benchmarks: the Keras environment did not load:\n{found.stderr[-3000:]}")
    environment = json.loads(found.stdout.strip().splitlines()[-1])
    name = environment["keras_backend"]
    return {"keras": environment["keras"], "backend": name, name: environment.get(name),
            "accelerator": environment["accelerator"]}


def machine(*packages: str, keras: bool = True) -> dict:
    """What a result records about where it was measured: :func:`host`, the
    installed versions of ``packages`` (read from their metadata, not
    imported), and with ``keras`` the backend (:func:`backend`)."""
    import importlib.metadata

    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {**host(), **versions, **(backend() if keras else {})}


# --- results files -------------------------------------------------------------

def write_results(result: Any, name: str | None = None, out: Path | None = None) -> Path:
    """Write ``result`` as indented JSON to ``out``, by default
    ``benchmarks/results/<name>.json``; return the path written."""
    path = Path(out) if out is not None else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def read_results(path: Path) -> Any | None:
    """A results file written by :func:`write_results`; None where there is none."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


# --- experiments and params ------------------------------------------------------

def load_params(path: Path = PARAMS_FILE) -> dict:
    """params.yaml as plain data: the benchmarks run the stages on edited
    copies of it (the stages validate what they are given)."""
    return yaml.safe_load(Path(path).read_text())


def seed_experiments(params: dict) -> list[str]:
    """The seed questions' experiments, in params.yaml's order: those that
    quote the seed's published figure (``seed_figure``) and that an improved
    model names in ``improves_on``. The question's deliberately broken
    colored-MNIST model quotes a figure too, but is reproduced for the way it
    fails, not improved upon; the pipeline's own experiments quote none."""
    experiments = params["experiments"]
    improved = {exp.get("improves_on") for exp in experiments.values()}
    return [name for name, exp in experiments.items() if exp.get("seed_figure") and name in improved]


def data_needs(params: dict, experiments: list[str]) -> tuple[list[str], list[str]]:
    """The datasets to download and prepare and the corruptions to make for these experiments."""
    datasets, corruptions = set(), set()
    for name in experiments:
        data = params["experiments"][name]["data"]
        for ref in (data["input"], data["target"]):
            kind, stem = ref.split("/", 1)
            if kind == "corrupted":
                corruptions.add(stem)
                datasets.add(params["corruptions"][stem]["dataset"])
            else:
                datasets.add(stem)
    return sorted(datasets), sorted(corruptions)


def apply_overrides(params: dict, items: list[str], new_keys: bool = False) -> dict:
    """Set each ``dotted.key=yaml-value`` in ``params`` (in place); only keys
    that exist, or with ``new_keys`` also keys and sections that do not (an
    option left at its default; the caller validates the result)."""
    for item in items:
        key, sep, value = item.partition("=")
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            if new_keys:
                node.setdefault(part, {})
            if not isinstance(node.get(part), dict):
                raise ValueError(f"--set {item}: params.yaml has no section '{part}' on the way to '{key}'")
            node = node[part]
        if not sep or (leaf not in node and not new_keys):
            raise ValueError(f"--set {item}: expected KEY=VALUE" + ("" if new_keys else " with KEY an existing param"))
        node[leaf] = yaml.safe_load(value)
    return params


# --- the stages, as dvc.yaml runs them ------------------------------------------------

DVC_FILE = ROOT / "dvc.yaml"
VARIABLE = re.compile(r"\$\{([^}]*)\}")


def _stage(stage: str) -> dict:
    stages = yaml.safe_load(DVC_FILE.read_text())["stages"]
    return stages[stage].get("do", stages[stage])


def _filled(text: str, stage: str, key: str | None, item: dict | None) -> str:
    """``text`` with ``${key}`` and ``${item.a.b}`` (a ``foreach`` stage's
    entry and its params) filled in; any other variable is an error."""
    def value(match: re.Match) -> str:
        name, *path = match.group(1).split(".")
        found: Any = {"key": key, "item": item}.get(name)
        for part in path:
            found = found.get(part) if isinstance(found, dict) else None
        if found is None or isinstance(found, (dict, list)):
            raise ValueError(f"dvc.yaml's {stage} stage has a variable the benchmarks do not fill: {match.group(0)}")
        return str(found)

    return VARIABLE.sub(value, text)


def stage_command(stage: str, key: str | None = None, item: dict | None = None) -> list[str]:
    """dvc.yaml's command of ``stage`` (``stage@key`` of a ``foreach`` stage,
    ``item`` its entry in params), its ``python`` this interpreter."""
    words = shlex.split(_filled(_stage(stage)["cmd"], stage, key, item))
    return [sys.executable, *words[1:]] if words[0] == "python" else words


def stage_outputs(stage: str, key: str | None = None, item: dict | None = None,
                  fields: tuple[str, ...] = ("outs", "metrics", "plots")) -> dict[str, dict]:
    """What dvc.yaml declares ``stage`` writes (in ``fields``: outs, metrics,
    plots), each path with its options (``cache``, ``persist``, ...)."""
    declared = {}
    for field in fields:
        for entry in _stage(stage).get(field) or []:
            path, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
            declared[_filled(path, stage, key, item)] = options or {}
    return declared


# --- the offline data mirror -------------------------------------------------------

# the offline mirror (DATA_MIRROR) holds CIFAR-10 as its JPEG copy only, not the
# official cifar-10-python.tar.gz that params.yaml names: whatever downloads from
# the mirror selects the copy explicitly, as `make repro-offline` and the CI smoke do
MIRROR_SOURCES = {"cifar10": "cifar10_jpeg"}
DEFAULT_MIRROR = ROOT.parent / "shared" / "datasets"


def data_mirror() -> str:
    """``DATA_MIRROR``, else the mirror beside the project (``../shared/datasets``)."""
    return os.environ.get("DATA_MIRROR") or str(DEFAULT_MIRROR)


def mirror_settings(params: dict) -> list[str]:
    """The ``KEY=VALUE`` settings (as ``dvc exp run -S`` takes them) that select
    the mirror's copy of each dataset of ``params`` the mirror holds only as a copy."""
    datasets = params.get("datasets") or {}
    return [f"datasets.{name}.source.builtin={builtin}" for name, builtin in MIRROR_SOURCES.items()
            if "builtin" in ((datasets.get(name) or {}).get("source") or {})]


def on_mirror(params: dict) -> dict:
    """A copy of ``params`` whose datasets read what the offline mirror holds."""
    return apply_overrides(copy.deepcopy(params), mirror_settings(params))


# --- scratch projects and child processes --------------------------------------------

def child_env(**extra: str) -> dict[str, str]:
    """This environment with the project's root first on ``PYTHONPATH``, so that
    a child started in another folder (a scratch project) imports this
    project's ``benchmarks``; a child run with ``python -m`` still takes
    ``stages`` from its own working folder first."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def scratch_project(folder: Path, params: dict) -> Path:
    """A project to run stages in without touching this one: a copy of
    ``stages/`` and ``params``, in ``folder``."""
    shutil.copytree(ROOT / "stages", folder / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


class Measured(NamedTuple):
    """One child process: wall and CPU seconds (user + system), peak RSS (MiB), its output."""
    wall_s: float
    cpu_s: float
    peak_mib: int
    output: str


def measured(cmd: list[str], cwd: Path, env: dict, watch=None) -> Measured:
    """Run one child process and measure it (:class:`Measured`); it failing stops
    the benchmark with its output's end.

    ``watch``, if given, is called with the child's pid once it has started and
    returns a context manager that is held while the child runs."""
    import contextlib

    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
        with watch(process.pid) if watch else contextlib.nullcontext():
            _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - started
        output.seek(0)
        text = output.read()
    if process.returncode != 0:
        raise SystemExit(f"benchmark: {' '.join(cmd)} failed in {cwd} ({process.returncode}):\n{text[-3000:]}")
    return Measured(elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss // 1024, text)


def timed(cmd: list[str], cwd: Path, env: dict, watch=None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (MiB) and stderr+stdout of one child process (:func:`measured`)."""
    run = measured(cmd, cwd, env, watch)
    return run.wall_s, run.peak_mib, run.output
