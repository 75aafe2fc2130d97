"""Benchmark: peak resident memory of every stage on a full-size dataset.

Runs the pipeline's stages for one dataset, each in a fresh process with the
command line ``dvc.yaml`` gives it (read from it), in a scratch project: a copy of
``stages/`` and a params.yaml holding the dataset, the corruptions of it that
the chosen experiments read, and those experiments, with
``limits.max_epochs`` set to ``--epochs`` (every epoch repeats the first's
allocations, so one shows the peak). In order: download (from DATA_MIRROR,
else the params' mirror or the official host; from a mirror, CIFAR-10 is the
JPEG copy the mirror holds, ``cifar10_jpeg``), prepare, each corruption,
train and evaluate of each experiment, and report. With ``--untrained`` the
train stage is replaced by saving an untrained model of the experiment's
architecture (not measured): evaluate's memory does not depend on the
weights, so its rows come in minutes instead of an epoch's hours. Each process's peak
resident set size comes from ``wait4`` (the largest of the process and its
children), its wall time beside it. While the process runs, its
``/proc/<pid>/status`` is read every 20 ms (Linux) and the sample with the most
resident memory is kept, split by kind: private anonymous memory (the heap,
arrays, tensors) and file-backed pages (the mapped code and data of the
shared libraries, TensorFlow's among them: shared with every process that
maps the same files, and dropped by the kernel under pressure rather than
swapped). Printed as a table and saved
(benchmarks/results/bench_memory-<dataset>.json, or ``--out``) with machine,
backend, versions and date.

    DATA_MIRROR=../shared/datasets python -m benchmarks.bench_memory          # CIFAR-10
    DATA_MIRROR=../shared/datasets python -m benchmarks.bench_memory --experiments cifar10_cnn
    python -m benchmarks.bench_memory --dataset mnist --limit-mib 1536
    python -m benchmarks.bench_memory --untrained --experiments cifar10_colorize cifar10_cnn_plus
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import yaml

from benchmarks.harness import (PARAMS_FILE, child_env, machine, on_mirror, scratch_project, stage_command, timed,
                                write_results)

log = logging.getLogger("bench_memory")


STATUS_KINDS = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}


def resident(pid: int) -> dict[str, int] | None:
    """A process's resident memory by kind, in KiB, from ``/proc/<pid>/status``;
    None where that is not there (not Linux, or the process has exited)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    if not all(name in fields for name in STATUS_KINDS):
        return None  # a zombie has no memory lines
    return {kind: int(fields[name].split()[0]) for name, kind in STATUS_KINDS.items()}


class ResidentSampler:
    """While held for a process (``with sampler.watching(pid):``), reads its
    resident memory by kind every ``interval`` seconds on a thread and keeps
    the sample with the most resident memory (:attr:`at_peak`, MiB; None if
    none was read). One process per sampler."""

    def __init__(self, interval: float = 0.02):
        self.pid, self.interval = None, interval
        self.most: dict[str, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watching(self, pid: int) -> "ResidentSampler":
        self.pid = pid
        return self

    def __enter__(self) -> "ResidentSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            sample = resident(self.pid)
            if sample and (self.most is None or sample["rss"] > self.most["rss"]):
                self.most = sample
            if self._stop.wait(self.interval):
                return

    @property
    def at_peak(self) -> dict[str, int] | None:
        return self.most and {kind: kib // 1024 for kind, kib in self.most.items()}


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
    chosen = {name: dict(all_experiments[name]) for name in experiments}
    for exp in chosen.values():  # an improved experiment measured without its seed: nothing to pair it with
        if exp.get("improves_on") not in (None, *chosen):
            del exp["improves_on"]
    return {**params, "datasets": {dataset: params["datasets"][dataset]},
            "corruptions": {name: corruptions[name] for name in used}, "experiments": chosen}


def save_untrained(name: str) -> None:
    """In the scratch project: what train@name leaves for evaluate, from an untrained model.

    The model is built and compiled as train builds it (a ``linear_path``
    autoencoder starts from its PCA); its history is its loss on the first
    256 validation images, a single point for the curves plot; the MLflow
    run is a new, empty one.
    """
    import mlflow

    from stages import params as params_mod
    from stages.experiment_data import Arrays, ExperimentData
    from stages.feeder import ScaledBatches
    from stages.mlflow_run import save_run_ref
    from stages.mlflow_store import EXPERIMENTS, connect
    from stages.training import compiled_model

    exp = params_mod.experiment(params_mod.load(Path("params.yaml")), name)
    data = ExperimentData(name, exp)
    fit_on, val = data.training()
    model = compiled_model(name, exp, fit_on.x.shape[1:], len(data.class_names), 1, 1, fit_on.y)
    n = min(256, len(val))
    batches = ScaledBatches(Arrays(val.x[:n], val.y[:n]), n, image_targets=exp.task == "autoencoder")
    loss = model.evaluate(batches, verbose=0, return_dict=True)["loss"]
    out = Path("models") / name
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model.keras")
    (out / "history.json").write_text(json.dumps({"untrained_val_loss": [float(loss)]}) + "\n")
    experiment_id = connect(EXPERIMENTS[exp.task])
    with mlflow.start_run(run_name=name) as run:
        mlflow.set_tag("bench_memory", "untrained model")
    save_run_ref(out / "run.json", run.info.run_id, experiment_id)


def commands(scratch: dict, untrained: bool = False) -> list[tuple[str, list[str]]]:
    """(stage name, command) in pipeline order, each dvc.yaml's (``python`` run
    as this interpreter). With ``untrained``, each train is an ``untrained@``
    step that this module runs."""
    [dataset] = scratch["datasets"]
    steps = [(f"{stage}@{dataset}", stage_command(stage, dataset, scratch["datasets"][dataset]))
             for stage in ("download", "prepare")]
    steps += [(f"corrupt@{name}", stage_command("corrupt", name, item))
              for name, item in scratch["corruptions"].items()]
    for name, item in scratch["experiments"].items():
        steps.append((f"untrained@{name}", [sys.executable, "-m", "benchmarks.bench_memory", "--save-untrained", name])
                     if untrained else (f"train@{name}", stage_command("train", name, item)))
        steps.append((f"evaluate@{name}", stage_command("evaluate", name, item)))
    return [*steps, ("report", stage_command("report"))]


def images(project: Path, dataset: str) -> dict[str, int]:
    from stages.images import load

    return {name: len(split) for name, split in load(project / "data/prepared" / f"{dataset}.npz").splits.items()}


def measure(scratch: dict, work: Path, untrained: bool = False) -> tuple[list[dict], dict[str, int]]:
    project = scratch_project(work / "project", scratch)
    env = child_env(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}")  # the untrained@ steps import benchmarks
    rows, counts = [], {}
    for stage, cmd in commands(scratch, untrained):
        if stage.startswith("untrained@"):  # not a pipeline stage: not measured
            done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"bench_memory: {stage} failed:\n{done.stderr[-3000:]}")
            continue
        sampler = ResidentSampler()
        seconds, peak_mib, _ = timed(cmd, project, env, watch=sampler.watching)
        at_peak = sampler.at_peak
        rows.append({"stage": stage, "wall_s": round(seconds, 1), "peak_rss_mib": peak_mib,
                     "sampled_at_peak_mib": at_peak})
        log.info("%s: %.1f s, peak RSS %d MiB%s", stage, seconds, peak_mib,
                 f" (sampled at its most: {at_peak['anon']} private, {at_peak['file']} file-backed)" if at_peak
                 else "")
        if stage.startswith("prepare@"):
            counts = images(project, stage.split("@", 1)[1])
    return rows, counts


def table(rows: list[dict], limit_mib: int) -> str:
    def kind(row: dict, name: str) -> str:
        return f"{row['sampled_at_peak_mib'][name]:,}" if row.get("sampled_at_peak_mib") else "-"

    lines = ["| stage | wall s | peak RSS MiB | of it private | of it file-backed | under the limit |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| `{r['stage']}` | {r['wall_s']:.1f} | {r['peak_rss_mib']:,} | {kind(r, 'anon')} | "
              f"{kind(r, 'file')} | {'yes' if r['peak_rss_mib'] < limit_mib else '**no**'} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file (default: the project's)")
    parser.add_argument("--dataset", default="cifar10", help="a dataset under 'datasets' (default: %(default)s)")
    parser.add_argument("--experiments", nargs="+", help="experiments on that dataset (default: those that "
                        "improve on none)")
    parser.add_argument("--epochs", type=int, default=1, help="limits.max_epochs for train (default: %(default)s)")
    parser.add_argument("--limit-mib", type=int, default=2048, help="the peak to stay under (default: %(default)s)")
    parser.add_argument("--untrained", action="store_true", help="evaluate untrained models instead of "
                        "training (evaluate's memory does not depend on the weights); no train rows")
    parser.add_argument("--save-untrained", metavar="EXPERIMENT", help=argparse.SUPPRESS)  # the untrained@ step
    parser.add_argument("--out", type=Path,
                        help="results JSON (default: benchmarks/results/bench_memory-<dataset>.json)")
    args = parser.parse_args(argv)
    if args.save_untrained:
        save_untrained(args.save_untrained)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, not {args.epochs}")
    try:
        params = yaml.safe_load(args.params.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"bench_memory: cannot read params file {args.params}: {exc}") from None
    mirror = os.environ.get("DATA_MIRROR") or (params.get("download") or {}).get("mirror")
    scratch = plan(on_mirror(params) if mirror else params, args.dataset, args.experiments)
    scratch["limits"] = {**(params.get("limits") or {}), "max_epochs": args.epochs, "max_samples": None}
    with tempfile.TemporaryDirectory(prefix="bench_memory-") as tmp:
        rows, counts = measure(scratch, Path(tmp), args.untrained)
    result = {"machine": machine(), "dataset": args.dataset, "images": counts,
              "epochs": 0 if args.untrained else args.epochs, "untrained": args.untrained, "mirror": mirror,
              "source": scratch["datasets"][args.dataset]["source"], "limit_mib": args.limit_mib, "stages": rows}
    out = write_results(result, f"bench_memory-{args.dataset}", args.out)
    over = [r["stage"] for r in rows if r["peak_rss_mib"] >= args.limit_mib]
    private_over = [r["stage"] for r in rows if (r["sampled_at_peak_mib"] or {}).get("anon", 0) >= args.limit_mib]
    print(table(rows, args.limit_mib))
    trained = "untrained models" if args.untrained else f"{args.epochs} epoch(s)"
    print(f"{args.dataset} {counts}, {trained}; over {args.limit_mib} MiB: {', '.join(over) or 'none'} "
          f"(private memory alone: {', '.join(private_over) or 'none'}); saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
