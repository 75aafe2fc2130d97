"""Benchmark: how long a model stage takes to start, and its memory then.

A stage that builds or loads a model (train, evaluate) starts by importing
its modules; Keras comes first through :mod:`stages.keras_start`, without
the optional integrations TensorFlow and Keras import and no stage uses.
Turn by turn, in fresh processes on one machine:

  * ours: ``import stages.<stage>``, what ``python -m stages.<stage>`` does
    before its ``main``;
  * plain: ``import keras`` first, as a script would, then the same import
    (Keras already there, nothing is left out).

Prints the median wall and CPU seconds and peak resident memory of each,
and the ratios plain/ours, with the machine, versions and date; results go
to benchmarks/results/start-<date>.json.

    python -m benchmarks.bench_start [--rounds 5] [--stages train evaluate]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys

from benchmarks.harness import ROOT, child_env, machine, measured, write_results

log = logging.getLogger("bench_start")

WAYS = {"ours": "import stages.{stage}", "plain": "import keras; import stages.{stage}"}


def turn(stage: str, way: str) -> dict:
    """One fresh process importing ``stage`` the ``way`` named: wall, CPU, peak RSS."""
    code = WAYS[way].format(stage=stage)
    run = measured([sys.executable, "-c", code], ROOT, child_env(TF_CPP_MIN_LOG_LEVEL="3"))
    return {"wall_s": round(run.wall_s, 3), "cpu_s": round(run.cpu_s, 3), "peak_mib": run.peak_mib}


def summary(turns: list[dict]) -> dict:
    """Medians over ``turns`` (each from :func:`turn`)."""
    return {key: round(statistics.median(t[key] for t in turns), 3) for key in ("wall_s", "cpu_s", "peak_mib")}


def compare(stage: str, rounds: int) -> dict:
    """``rounds`` rounds of both ways, alternating which goes first."""
    turns = {way: [] for way in WAYS}
    for index in range(rounds):
        for way in (WAYS if index % 2 == 0 else reversed(WAYS)):
            turns[way].append(turn(stage, way))
            log.info("%s round %d %s: %s", stage, index, way, turns[way][-1])
    ours, plain = summary(turns["ours"]), summary(turns["plain"])
    return {"stage": stage, "rounds": rounds, "ours": ours, "plain": plain, "turns": turns,
            "ratio_wall": round(plain["wall_s"] / ours["wall_s"], 3),
            "ratio_cpu": round(plain["cpu_s"] / ours["cpu_s"], 3),
            "memory_saved_mib": plain["peak_mib"] - ours["peak_mib"]}


def table(results: list[dict]) -> str:
    """A Markdown table of :func:`compare`'s results."""
    lines = ["| stage | rounds | wall s, plain / ours (median) | CPU s, plain / ours | plain/ours: wall, CPU "
             "| peak RSS plain / ours |", "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        p, o = r["plain"], r["ours"]
        lines.append(f"| `{r['stage']}` | {r['rounds']} | {p['wall_s']:.2f} / {o['wall_s']:.2f} "
                     f"| {p['cpu_s']:.2f} / {o['cpu_s']:.2f} | {r['ratio_wall']:.2f}x, {r['ratio_cpu']:.2f}x "
                     f"| {p['peak_mib']:,} / {o['peak_mib']:,} MiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stages", nargs="+", default=["train", "evaluate"], choices=["train", "evaluate"])
    parser.add_argument("--out", help="results JSON (default: benchmarks/results/start-<date>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    result = {"machine": machine("tensorflow", "jax", "scikit-learn", "pandas"),
              "stages": [compare(stage, args.rounds) for stage in args.stages]}
    path = write_results(result, f"start-{result['machine']['date']}", args.out)
    print(table(result["stages"]))
    log.info("results in %s: %s", path, json.dumps(result["machine"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
