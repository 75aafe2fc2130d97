"""Turn what ``offline_gpu/on_node.sh`` measured on a GPU node (its OUT)
into markdown tables.

    python -m offline_gpu.report OUT

Reads what the parts wrote, skipping parts that did not run: ``bench.json``
(ours against the seed), ``cost.json`` (FLOPs and bytes per image),
``options.tar.gz`` (one ``benchmarks.bench_train --ours-only`` result per
option), ``fast.json`` and ``runs.json`` (``offline_gpu.runs``' summaries), and
``seeds.json`` (the same, of the seed experiments alone). Achieved FLOP/s and bandwidth are
estimates: images per second (an epoch's training and validation images
over its time) times XLA's per-image cost of a training step, so they
overstate a little (a validation image costs a forward pass, a third of a
step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
from pathlib import Path

from benchmarks.bench_train import table
from benchmarks.harness import load_params, read_results, seed_experiments

SEED_TARGET_S = 300  # the target: every seed experiment, train and evaluate, in under 5 minutes in total


def achieved(images_per_s: float, cost: dict | None) -> str:
    """``TFLOP/s, GB/s`` at this throughput, from XLA's per-image counts."""
    if not cost or "xla_train_flops_per_image" not in cost:
        return "n/a"
    flops = images_per_s * cost["xla_train_flops_per_image"] / 1e12
    bandwidth = images_per_s * cost["xla_bytes_per_image"] / 1e9
    return f"{flops:.2f} TFLOP/s, {bandwidth:,.0f} GB/s"


def bench_section(bench: dict, costs: dict[str, dict]) -> str:
    def median_max(values) -> str:  # with checkpoint_interval_s most epochs write none: the max is one write
        return f"{statistics.median(values):.2f} / {max(values):.2f} s" if values else "n/a"

    lines = [table(bench), "", "| experiment | ours: achieved (estimate) | seed: achieved (estimate) | "
             "ours after each epoch: checkpoint (median / max) | ours: MLflow batch (median / max) |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in bench["experiments"].items():
        seed, ours = r["seed"], r["ours"]
        lines.append(f"| `{name}` | {achieved(ours['images_per_s'], costs.get(name))} | "
                     f"{achieved(seed['images_per_s'], costs.get(name)) if seed else 'n/a'} | "
                     f"{median_max(ours.get('checkpoint_s'))} | {median_max(ours.get('tracking_s'))} |")
    return "\n".join(lines)


def options_section(options: list[dict], bench: dict | None, costs: dict[str, dict]) -> str:
    """One row per option run, against ours with no option: in ``bench``, else
    the options run that sets none (same experiment)."""
    def label(result: dict) -> str:
        flags = [f"XLA_FLAGS={result['xla_flags']}"] if result.get("xla_flags") else []
        return ", ".join(list(result["ours_overrides"]) + flags) or "none"

    plain_run = next((r for r in options if label(r) == "none"), None)
    lines = ["| experiment | option | batch | epochs | images/s | median epoch | vs no option | device peak | "
             "achieved (estimate) | after the last epoch |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in options:
        for name, r in result["experiments"].items():
            ours = r["ours"]
            plain = ((bench or {}).get("experiments", {}).get(name, {}).get("ours")
                     or (plain_run or {}).get("experiments", {}).get(name, {}).get("ours"))
            versus = f"{ours['images_per_s'] / plain['images_per_s']:.2f}x" if plain else "n/a"
            peak = "n/a" if ours.get("device_peak_mib") is None else f"{ours['device_peak_mib']:,} MiB"
            lines.append(f"| `{name}` | {label(result)} | {r['batch_size']} | "
                         f"{r['epochs']} | {ours['images_per_s']:,.0f} | {ours['median_epoch_s']:.2f} s | {versus} | "
                         f"{peak} | {achieved(ours['images_per_s'], costs.get(name))} | "
                         f"{validation(ours.get('history'))} |")
    return "\n".join(lines)


def validation(history: dict | None) -> str:
    """The validation figures after the last epoch, from the stage's history:
    whether an option that is faster also trains as well (a larger batch
    takes fewer steps an epoch)."""
    shown = [f"{key} {values[-1]:.4g}" for key, values in sorted((history or {}).items())
             if key.startswith("val_") and values]
    return ", ".join(shown) or "n/a"


def headline(test: dict) -> str:
    """The figure the README reports for an experiment's test split."""
    if "accuracy" in test:
        return f"test accuracy {test['accuracy']:.2%}"
    parts = [f"PSNR {test['psnr']:.2f} dB"]
    if "keras_accuracy" in test:
        parts.append(f"Keras accuracy {test['keras_accuracy']:.1%}")
    return ", ".join(parts)


def seeds_section(seeds: dict) -> str:
    lines = ["| experiment | epochs | train stage | evaluate stage | test |", "| --- | --- | --- | --- | --- |"]
    for name, r in sorted(seeds.get("experiments", {}).items()):
        lines.append(f"| `{name}` | {r['epochs']} | {r['train_s']:.0f} s | {r['evaluate_s']:.0f} s | "
                     f"{headline(r['test'])} |")
    total = seeds.get("data_s", 0) + seeds.get("wall_s", 0)
    verdict = "met" if total < SEED_TARGET_S and not seeds.get("failed") else "not met"
    if seeds.get("overrides"):
        verdict = "no verdict: not at seed settings"
    lines += ["", f"Data stages {seeds.get('data_s', 0):.0f} s, then the experiments side by side "
                  f"{seeds.get('wall_s', 0):.0f} s: {total:.0f} s in all against the {SEED_TARGET_S} s target "
                  f"({verdict}){'; failed: ' + '; '.join(seeds['failed']) if seeds.get('failed') else ''}."]
    if seeds.get("overrides"):
        lines.append(f"With overrides {', '.join(seeds['overrides'])}: not seed settings.")
    return "\n".join(lines)


FAST = "cifar10_fast"
FAST_ACCURACY, FAST_TRAIN_S = 0.93, 60  # on the JPEG copy of CIFAR-10; the train stage, compile included


def runs_section(runs: dict, fast: dict | None, seeds: list[str] | None = None) -> str:
    """Every experiment of the ``fast`` and ``runs`` parts with its times and
    test figures, then the two targets they measure: ``cifar10_fast`` (alone
    on the GPU) and the seed experiments (``seeds``, by default params.yaml's;
    side by side with the rest)."""
    seeds = seed_experiments(load_params()) if seeds is None else seeds
    experiments = {**runs.get("experiments", {}), **(fast or {}).get("experiments", {})}
    lines = ["| experiment | epochs | train stage | of which fit | evaluate stage | ended after | test |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in sorted(experiments.items()):
        fit = r.get("trained", {}).get("fit_seconds")
        train = "an earlier run" if r["train_s"] is None else f"{r['train_s']:.0f} s"
        lines.append(f"| `{name}` | {r['epochs']} | {train} | "
                     f"{'n/a' if fit is None else f'{fit:.0f} s'} | {r['evaluate_s']:.0f} s | "
                     f"{r.get('ended_s', 0):.0f} s | {headline(r['test'])} |")
    notes = []
    if runs.get("failed"):
        notes.append("Not finished in this run: " + "; ".join(runs["failed"]) + ".")
    overrides = runs.get("overrides") or (fast or {}).get("overrides")
    if overrides:
        notes.append(f"With overrides {', '.join(overrides)}: not the experiments' settings, no verdicts.")
    elif FAST in experiments:
        r = experiments[FAST]
        met = r["test"]["accuracy"] >= FAST_ACCURACY and (r["train_s"] or float("inf")) <= FAST_TRAIN_S
        notes.append(f"`{FAST}` alone on the GPU: test accuracy {r['test']['accuracy']:.2%} (target "
                     f"{FAST_ACCURACY:.0%} on the JPEG copy), train stage {r['train_s'] or float('nan'):.0f} s (target "
                     f"{FAST_TRAIN_S} s): {'met' if met else 'not met'}.")
    finished = [experiments[name] for name in seeds if name in experiments]
    if len(finished) == len(seeds) and not overrides:
        last = max(r.get("ended_s", 0) for r in finished)
        total = runs.get("data_s", 0) + last
        notes.append(f"The {len(seeds)} seed experiments, side by side with the others: the last ended {last:.0f} s "
                     f"after they began, {total:.0f} s with the data stages, against the {SEED_TARGET_S} s target "
                     f"({'met' if total < SEED_TARGET_S else 'not met'}).")
    elif not overrides:
        notes.append(f"Seed experiments finished in this run: {len(finished)} of {len(seeds)}; no verdict on the "
                     f"{SEED_TARGET_S} s target.")
    return "\n".join(lines + [""] + notes)


def read_options(archive: Path) -> list[dict]:
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".json")),
                         key=lambda m: m.name)
        return [json.load(tar.extractfile(m)) for m in members]


def report(out: Path) -> str:
    def load(name: str):
        return read_results(out / name)

    bench, seeds, runs, fast = load("bench.json"), load("seeds.json"), load("runs.json"), load("fast.json")
    costs = {c["experiment"]: c for c in (load("cost.json") or [])}
    options = read_options(out / "options.tar.gz") if (out / "options.tar.gz").is_file() else []
    machine = (bench or (options[0] if options else {})).get("machine")
    sections = [f"Machine: {json.dumps(machine)}" if machine else "Machine: not recorded (no bench part)"]
    if bench:
        sections += ["## Ours against the seed's script", bench_section(bench, costs)]
    if options:
        sections += ["## Options", options_section(options, bench, costs)]
    if runs or fast:
        gpu = (runs or fast).get("gpu", "no GPU")
        sections += [f"## Every experiment at its settings ({gpu})", runs_section(runs or {}, fast)]
    if seeds:
        sections += [f"## Seed experiments at seed settings ({seeds.get('gpu', 'no GPU')})", seeds_section(seeds)]
    if costs:
        sections += ["## Cost of a training step",
                     "\n".join(f"`{n}`: {json.dumps({k: v for k, v in c.items() if k != 'experiment'})}"
                               for n, c in costs.items())]
    return "\n\n".join(sections) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder offline_gpu/on_node.sh wrote (its OUT)")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        parser.error(f"{args.out}: not a folder")
    sys.stdout.write(report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
