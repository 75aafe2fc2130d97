"""Build the kit that a GPU node without internet needs to run the pipeline.

The node is assumed to have Python with JAX for CUDA and the common
scientific packages, but neither the rest of this project's dependencies
nor a network. This fills an ignored folder (default ``.gpu/``) with:

* ``whl/``: wheels of the packages the stages import that such a node lacks
  (``WHEELS``; with ``--dvc`` also DVC's, for ``dvc commit`` there), at the
  versions installed here (the set the tests ran with), for the node's Python
  (``--python-version``) and platform;
* ``mirror/``: the offline dataset mirror's folders the chosen experiments
  read (from ``--mirror``, default ``DATA_MIRROR``), laid out as a mirror, so
  the data stages run there unchanged with ``DATA_MIRROR=.gpu/mirror``;
* ``experiments.txt``: the experiments to run there;
* ``settings.txt``: the params (``KEY=VALUE``, as ``dvc exp run -S`` takes
  them) the copy of the project runs with there: the mirror's source for
  each dataset it holds only as a copy (CIFAR-10 as ``cifar10_jpeg``), and any
  ``--set``;

adds the folder to ``.git/info/exclude`` and refuses a kit that, with the
project's files, is over ``--max-mib`` (the most the transfer to the node
may carry; 0: no limit). ``offline_gpu/on_node.sh`` then runs on the node.

    DATA_MIRROR=../shared/datasets python -m offline_gpu.kit
    DATA_MIRROR=../shared/datasets python -m offline_gpu.kit --dvc --experiments all --datasets mnist cifar10
    python -m offline_gpu.kit --python-version 3.11 --dest /tmp/rehearsal   # to rehearse on this machine
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import ROOT, apply_overrides, data_needs, load_params, mirror_settings, seed_experiments

log = logging.getLogger("offline_gpu.kit")

MAX_MIB = 64  # the default limit on the kit and the project's files together

# The stages' imports that a GPU node with JAX typically lacks (it is assumed
# to have JAX, NumPy, SciPy, Matplotlib, Pillow, PyYAML, requests, tqdm,
# pandas, pyarrow, protobuf, click, cloudpickle, packaging). MLflow as
# mlflow-skinny (the same ``mlflow`` package without the UI's files; it has the
# SQLite store and ``mlflow.keras``), which is what a run needs.
WHEELS = (
    "keras", "namex", "optree",
    "mlflow-skinny", "mlflow-tracing", "sqlalchemy", "alembic", "mako", "greenlet",
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "tenacity",
    "cachetools", "sqlparse", "python-dotenv", "importlib-metadata", "databricks-sdk", "google-auth",
    "pyasn1", "pyasn1-modules", "gitpython", "gitdb", "smmap", "fastapi", "starlette", "uvicorn",
    "opentelemetry-api", "opentelemetry-sdk", "opentelemetry-proto", "opentelemetry-semantic-conventions",
    "cryptography", "cffi", "pycparser",
)
# DVC and what it needs beyond WHEELS and the node's packages, for ``dvc commit`` and
# ``dvc status`` there (``--dvc``), in a tree without .git (``core.no_scm``):
# pygit2 (4.7 MiB) and dvc-task's Celery queue are left out, as neither runs
# without git or a queue; antlr4-python3-runtime is a source package, built here
DVC_WHEELS = (
    "dvc", "dvc-data", "dvc-http", "dvc-objects", "dvc-render", "dvc-studio-client", "dvc-task", "scmrepo",
    "aiohttp-retry", "antlr4-python3-runtime", "appdirs", "asyncssh", "atpublic", "configobj", "dictdiffer",
    "diskcache", "distro", "dpath", "dulwich", "entrypoints", "flatten-dict", "flufl-lock", "funcy", "grandalf",
    "gto", "hydra-core", "iterative-telemetry", "omegaconf", "orjson", "platformdirs", "pydantic-settings",
    "pydot", "pygtrie", "ruamel-yaml", "semver", "shortuuid", "shtab", "sqltrie", "tomlkit", "tzlocal",
    "voluptuous", "zc-lockfile",
)
SOURCE_ONLY = ("antlr4-python3-runtime",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def pinned(names=WHEELS) -> list[str]:
    """``name==version`` of each package as installed here."""
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"offline_gpu.kit: {name} is not installed here; install the project first "
                             "(pip install -e '.[dev]')") from None
    return pins


def mirror_dirs(params: dict, experiments: list[str]) -> list[str]:
    """The mirror folders holding the datasets these experiments read (with
    ``params``' sources: the kit's settings applied)."""
    from stages.sources import SOURCES

    datasets, _ = data_needs(params, experiments)
    folders = []
    for name in datasets:
        source = params["datasets"][name]["source"]
        if "builtin" not in source:
            raise SystemExit(f"offline_gpu.kit: datasets.{name} is not a builtin source; copy its files by hand")
        folders.append(SOURCES[source["builtin"]].mirror_dir)
    return sorted(set(folders))


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def tree_size() -> int:
    """The project's files that travel with the kit: tracked and untracked,
    not ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in listed if name and (ROOT / name.decode()).is_file())


def exclude(dest: Path) -> None:
    """Keep ``dest`` out of git (and out of :func:`tree_size`'s count)."""
    try:
        rel = dest.resolve().relative_to(ROOT)
    except ValueError:
        return  # outside the checkout: nothing to ignore
    exclude_file = ROOT / ".git/info/exclude"
    entry = f"/{rel.as_posix()}/"
    lines = exclude_file.read_text().splitlines() if exclude_file.exists() else []
    if entry not in lines:
        exclude_file.parent.mkdir(parents=True, exist_ok=True)
        exclude_file.write_text("\n".join([*lines, entry]) + "\n")


def settings(params: dict, extra: list[str]) -> list[str]:
    """The kit's params settings: the mirror's copies, then ``extra``."""
    return [*mirror_settings(params), *extra]


def main(argv=None) -> int:
    params = load_params()
    seeds = seed_experiments(params)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", nargs="+", default=seeds,
                        help=f"default: the seed experiments ({' '.join(seeds)}); 'all': every experiment whose "
                             "data is in the mirror folders of --datasets")
    parser.add_argument("--datasets", nargs="+", help="with --experiments all: the datasets to carry")
    parser.add_argument("--dest", type=Path, default=ROOT / ".gpu")
    parser.add_argument("--python-version", default="3.12", help="the node's Python (default %(default)s)")
    parser.add_argument("--mirror", default=os.environ.get("DATA_MIRROR"), help="default: $DATA_MIRROR")
    parser.add_argument("--dvc", action="store_true", help="also DVC's wheels, for dvc commit there")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a param the project runs with there (repeatable), beside the mirror's sources")
    parser.add_argument("--max-mib", type=float, default=MAX_MIB,
                        help="the most the kit and the project's files may weigh together, in MiB: what the "
                             "transfer to the node carries (default %(default)s; 0: no limit)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.mirror or not Path(args.mirror).is_dir():
        parser.error(f"--mirror/DATA_MIRROR: {args.mirror!r} is not a folder (the offline dataset mirror)")
    kit_settings = settings(params, args.set)
    try:
        apply_overrides(params, kit_settings)
    except ValueError as exc:
        parser.error(str(exc))
    if args.experiments == ["all"]:
        if not args.datasets:
            parser.error("--experiments all needs --datasets")
        args.experiments = [name for name in params["experiments"]
                            if set(data_needs(params, [name])[0]) <= set(args.datasets)]
    unknown = [name for name in args.experiments if name not in params["experiments"]]
    if unknown:
        parser.error(f"no experiment {', '.join(unknown)} in params.yaml")

    staging = args.dest.with_name(args.dest.name + ".partial")
    exclude(args.dest), exclude(staging)  # neither travels as part of the project's files
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "whl").mkdir(parents=True)
    platforms = [flag for p in PLATFORMS for flag in ("--platform", p)]
    names = WHEELS + (DVC_WHEELS if args.dvc else ())
    binary = pinned(tuple(n for n in names if n not in SOURCE_ONLY))
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", args.python_version, "--implementation", "cp", *platforms,
                    "-d", str(staging / "whl"), *binary], check=True)
    source = pinned(tuple(n for n in names if n in SOURCE_ONLY))
    if source:  # pure Python: the wheel built here installs there
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(staging / "whl"),
                        *source], check=True)
    (staging / "experiments.txt").write_text("\n".join(args.experiments) + "\n")
    (staging / "settings.txt").write_text("".join(f"{item}\n" for item in kit_settings))
    for folder in mirror_dirs(params, args.experiments):
        shutil.copytree(Path(args.mirror) / folder, staging / "mirror" / folder)
    kit, tree = size(staging), tree_size()
    limit = f"of the {args.max_mib:g} MiB limit" if args.max_mib else "(no limit)"
    log.info("kit %.1f MiB (wheels %.1f, mirror %.1f) + the project's files %.1f MiB %s",
             kit / 2**20, size(staging / "whl") / 2**20, size(staging / "mirror") / 2**20, tree / 2**20, limit)
    if args.max_mib and kit + tree > args.max_mib * 2**20:
        shutil.rmtree(staging)
        raise SystemExit(f"offline_gpu.kit: {(kit + tree) / 2**20:.1f} MiB is over the {args.max_mib:g} MiB of "
                         "--max-mib; choose fewer experiments (their datasets), or raise the limit")
    shutil.rmtree(args.dest, ignore_errors=True)
    staging.rename(args.dest)
    log.info("ready: %s (settings: %s)", args.dest, ", ".join(kit_settings) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
