"""Benchmark: peak resident memory of every stage on a full-size dataset.

Runs the pipeline's stages for one dataset, each in a fresh process with the
command line ``dvc.yaml`` gives it (read from it), in a scratch project: a copy of
``stages/`` and a params.yaml holding the dataset, the corruptions of it that
the chosen experiments read, and those experiments, with
``limits.max_epochs`` set to ``--epochs`` (every epoch repeats the first's
allocations, so one shows the peak). In order: download (from DATA_MIRROR,
else the params' mirror or the official host), prepare, each corruption,
train and evaluate of each experiment, and report. Each process's peak
resident set size comes from ``wait4`` (the largest of the process and its
children), its wall time beside it. Printed as a table and saved
(benchmarks/results/bench_memory-<dataset>.json, or ``--out``) with machine,
backend, versions and date.

    DATA_MIRROR=../shared/datasets python benchmarks/bench_memory.py          # CIFAR-10
    DATA_MIRROR=../shared/datasets python benchmarks/bench_memory.py --experiments cifar10_cnn
    python benchmarks/bench_memory.py --dataset mnist --limit-mib 1536
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_train import machine, timed  # noqa: E402 (benchmarks/, this script's folder)

log = logging.getLogger("bench_memory")


def data_refs(exp: dict) -> set[str]:
    return {exp["data"]["input"], exp["data"]["target"]}


def dataset_of(ref: str, corruptions: dict) -> str | None:
    """``prepared/cifar10`` -> cifar10; ``corrupted/cifar10_grey`` -> its corruption's dataset."""
    kind, _, name = ref.partition("/")
    if kind == "prepared":
        return name
    return (corruptions.get(name) or {}).get("dataset") if kind == "corrupted" else None


def plan(params: dict, dataset: str, experiments: list[str] | None) -> dict:
    """The scratch params: the dataset, the corruptions the experiments read, the experiments.

    Without ``experiments``: every experiment on the dataset that improves on
    none (the seeds' and the pipeline's own, not the larger improved models)."""
    if dataset not in params.get("datasets", {}):
        raise SystemExit(f"bench_memory: dataset {dataset!r} is not under 'datasets' in the params "
                         f"({', '.join(params.get('datasets', {}))})")
    corruptions, all_experiments = params.get("corruptions") or {}, params.get("experiments") or {}
    on_dataset = [name for name, exp in all_experiments.items()
                  if {dataset_of(ref, corruptions) for ref in data_refs(exp)} == {dataset}]
    if experiments is None:
        experiments = [name for name in on_dataset if not all_experiments[name].get("improves_on")]
    unknown = [name for name in experiments if name not in on_dataset]
    if unknown:
        raise SystemExit(f"bench_memory: experiments {', '.join(unknown)} are not experiments on {dataset!r} "
                         f"in the params (choose from {', '.join(on_dataset) or 'none'})")
    if not experiments:
        raise SystemExit(f"bench_memory: no experiment on {dataset!r} to run; name some with --experiments")
    used = sorted({ref.split("/", 1)[1] for name in experiments for ref in data_refs(all_experiments[name])
                   if ref.startswith("corrupted/")})
    return {**params, "datasets": {dataset: params["datasets"][dataset]},
            "corruptions": {name: corruptions[name] for name in used},
            "experiments": {name: all_experiments[name] for name in experiments}}


def commands(scratch: dict) -> list[tuple[str, list[str]]]:
    """(stage name, command) in pipeline order, each ``cmd`` of dvc.yaml with
    its ``${key}`` and ``${item.*}`` filled in (``python`` run as this interpreter)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

    def command(stage: str, key: str | None = None, item: dict | None = None) -> list[str]:
        text = stages[stage]["do"]["cmd"] if key is not None else stages[stage]["cmd"]
        for name, value in {"key": key, **{f"item.{k}": v for k, v in (item or {}).items()}}.items():
            text = text.replace("${%s}" % name, str(value))
        if "${" in text:
            raise SystemExit(f"bench_memory: dvc.yaml's {stage} command has a variable this script does not fill: "
                             f"{text}")
        words = shlex.split(text)
        return [sys.executable, *words[1:]] if words[0] == "python" else words

    [dataset] = scratch["datasets"]
    steps = [(f"{stage}@{dataset}", command(stage, dataset, scratch["datasets"][dataset]))
             for stage in ("download", "prepare")]
    steps += [(f"corrupt@{name}", command("corrupt", name, item)) for name, item in scratch["corruptions"].items()]
    for name, item in scratch["experiments"].items():
        steps += [(f"{stage}@{name}", command(stage, name, item)) for stage in ("train", "evaluate")]
    return [*steps, ("report", command("report"))]


def images(project: Path, dataset: str) -> dict[str, int]:
    from stages.images import load

    return {name: len(split) for name, split in load(project / "data/prepared" / f"{dataset}.npz").splits.items()}


def measure(scratch: dict, work: Path) -> tuple[list[dict], dict[str, int]]:
    project = work / "project"
    shutil.copytree(ROOT / "stages", project / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "params.yaml").write_text(yaml.safe_dump(scratch, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    rows, counts = [], {}
    for stage, cmd in commands(scratch):
        seconds, peak_mib, _ = timed(cmd, project, env)
        rows.append({"stage": stage, "wall_s": round(seconds, 1), "peak_rss_mib": peak_mib})
        log.info("%s: %.1f s, peak RSS %d MiB", stage, seconds, peak_mib)
        if stage.startswith("prepare@"):
            counts = images(project, stage.split("@", 1)[1])
    return rows, counts


def table(rows: list[dict], limit_mib: int) -> str:
    lines = ["| stage | wall s | peak RSS MiB | under the limit |", "| --- | --- | --- | --- |"]
    lines += [f"| `{r['stage']}` | {r['wall_s']:.1f} | {r['peak_rss_mib']:,} | "
              f"{'yes' if r['peak_rss_mib'] < limit_mib else '**no**'} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="params file (default: the repo's)")
    parser.add_argument("--dataset", default="cifar10", help="a dataset under 'datasets' (default: %(default)s)")
    parser.add_argument("--experiments", nargs="+", help="experiments on that dataset (default: those that "
                        "improve on none)")
    parser.add_argument("--epochs", type=int, default=1, help="limits.max_epochs for train (default: %(default)s)")
    parser.add_argument("--limit-mib", type=int, default=2048, help="the peak to stay under (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/bench_memory-<dataset>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, not {args.epochs}")
    try:
        params = yaml.safe_load(args.params.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"bench_memory: cannot read params file {args.params}: {exc}") from None
    scratch = plan(params, args.dataset, args.experiments)
    scratch["limits"] = {**(params.get("limits") or {}), "max_epochs": args.epochs, "max_samples": None}
    with tempfile.TemporaryDirectory(prefix="bench_memory-") as tmp:
        rows, counts = measure(scratch, Path(tmp))
    result = {"machine": machine(), "dataset": args.dataset, "images": counts, "epochs": args.epochs,
              "mirror": os.environ.get("DATA_MIRROR"), "limit_mib": args.limit_mib, "stages": rows}
    out = args.out or ROOT / "benchmarks" / "results" / f"bench_memory-{args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    over = [r["stage"] for r in rows if r["peak_rss_mib"] >= args.limit_mib]
    print(table(rows, args.limit_mib))
    print(f"{args.dataset} {counts}, {args.epochs} epoch(s); over {args.limit_mib} MiB: {', '.join(over) or 'none'}; "
          f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
