"""Compare a sweep: the DVC experiments of one baseline commit side by side.

    python -m cluster.compare                      # the experiments of HEAD
    python -m cluster.compare --exp bs-1 --exp bs-2 --out reports/sweep.md
    python -m cluster.compare --rev main --only mnist_cae
    python -m cluster.compare --all-commits        # every baseline's experiments

It reads ``dvc exp show --json``, finds the params that differ between the
experiments (and their baseline commit, shown as a reference row), and writes
one markdown table for each params.yaml experiment the sweep changes: a row
per DVC experiment with the varied params and the test metrics of
``metrics/<experiment>.json`` (``test.psnr`` and ``test.ssim`` for an
autoencoder, ``test.accuracy`` and ``test.loss`` for a classifier), best
first. The best row is marked "(best)"; rows equal to it on both metrics
share the mark. Queued, running and failed experiments are named under the
table, not compared: DVC shows a failed one with its baseline's metrics.

A sweep that changes only ``experiments.<name>.*`` keys is compared on that
experiment's metrics; one that changes a key elsewhere (``limits``,
``datasets``, ...) on every experiment's. ``--only`` names them instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from stages import atomic

log = logging.getLogger("cluster.compare")

# Per task: (metric in the metrics file's "test" section, higher is better); the first ranks the rows,
# the second breaks ties (tiny test sets give equal accuracies).
KEY_METRICS = {"autoencoder": (("psnr", True), ("ssim", True)),
               "classifier": (("accuracy", True), ("loss", False))}
DIGITS = {"psnr": 2, "ssim": 4, "accuracy": 4, "loss": 4}
FINISHED = ("baseline", "success")


class CompareError(RuntimeError):
    """No experiments to compare, or a name that does not match any; the message says which."""


@dataclass
class Run:
    """One DVC experiment, or the baseline commit it was derived from."""

    name: str
    rev: str
    state: str                                   # baseline, success, queued, running, failed
    params: dict[str, object] = field(default_factory=dict)   # params.yaml, flattened: "a.b.c" -> value
    metrics: dict[str, dict] = field(default_factory=dict)    # params.yaml experiment -> its metrics file


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _run(entry: dict, name: str, state: str) -> Run:
    data = entry.get("data") or {}
    params = flatten((data.get("params") or {}).get("params.yaml", {}).get("data") or {})
    metrics = {}
    for path, content in (data.get("metrics") or {}).items():
        folder, _, file_name = path.rpartition("/")
        if folder == "metrics" and file_name.endswith(".json") and content.get("data"):
            metrics[file_name[:-len(".json")]] = content["data"]
    return Run(name=name, rev=entry["rev"], state=state, params=params, metrics=metrics)


def parse_exp_show(doc: list[dict], names: tuple[str, ...] = ()) -> list[Run]:
    """The baselines and experiments in ``dvc exp show --json`` output (the workspace left out).

    With ``names``, only those experiments and their baselines; a name that
    matches none is a :class:`CompareError` listing the names there are.
    """
    runs, found = [], {}
    for commit in doc:
        if commit.get("rev") == "workspace":
            continue
        experiments = []
        for exp in commit.get("experiments") or []:
            first = exp["revs"][0]
            name = exp.get("name") or first.get("name") or first["rev"][:7]
            executor = exp.get("executor") or {}
            state = "failed" if first.get("error") else executor.get("state") or "success"
            found[name] = state
            if not names or name in names:
                experiments.append(_run(first, name, state))
        if experiments or not names:
            runs.append(_run(commit, f"{commit.get('name') or commit['rev'][:7]} (baseline)", "baseline"))
            runs.extend(experiments)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise CompareError(f"no experiment named {', '.join(map(repr, unknown))}; the experiments there are: "
                           f"{', '.join(sorted(found)) or 'none'}")
    if not found:
        raise CompareError("no experiments found; queue a sweep with dvc exp run --queue -S "
                           "'experiments.<name>.training.batch_size=64,128' and run it with dvc queue start")
    if not any(run.state == "success" for run in runs):
        raise CompareError("none of the experiments has finished: "
                           + ", ".join(f"{run.name} ({run.state})" for run in runs if run.state != "baseline"))
    return runs


def varied_params(runs: list[Run]) -> list[str]:
    """The params whose values are not the same in every run (a key some runs lack counts), in file order."""
    keys = list(dict.fromkeys(key for run in runs for key in run.params))
    return [key for key in keys
            if len({(key in run.params, json.dumps(run.params.get(key), sort_keys=True)) for run in runs}) > 1]


def sections(runs: list[Run], varied: list[str], only: tuple[str, ...] = ()) -> list[str]:
    """The params.yaml experiments to compare: ``only``, else those the varied params belong to, else all."""
    available = list(dict.fromkeys(name for run in runs for name in run.metrics))
    if only:
        unknown = [name for name in only if name not in available]
        if unknown:
            raise CompareError(f"--only {', '.join(map(repr, unknown))}: no metrics file metrics/<name>.json "
                               f"for it; the experiments with metrics are: {', '.join(available) or 'none'}")
        return list(only)
    touched = {key.split(".")[1] for key in varied if key.startswith("experiments.") and key.count(".") >= 2}
    if not varied or any(not key.startswith("experiments.") for key in varied):
        return available
    return [name for name in available if name in touched]


def _task(run: Run, section: str) -> str:
    return run.metrics[section].get("task") or str(run.params.get(f"experiments.{section}.task", ""))


def _cell(value: object, digits: int | None = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and digits is not None:
        return f"{value:.{digits}f}"
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|")


def table(runs: list[Run], section: str, varied: list[str]) -> list[str]:
    """Markdown lines: the finished runs with metrics for ``section``, best first and marked."""
    rows = [run for run in runs if run.state in FINISHED and section in run.metrics]
    task = _task(rows[0], section)
    if task not in KEY_METRICS:
        raise CompareError(f"metrics/{section}.json: task {task!r} is neither autoencoder nor classifier")
    keys = KEY_METRICS[task]
    prefix = f"experiments.{section}."
    columns = [key for key in varied if key.startswith(prefix) or not key.startswith("experiments.")]

    def score(run: Run) -> tuple:
        test = run.metrics[section].get("test", {})
        values = [test.get(metric) for metric, _ in keys]
        return tuple((value is None, -value if higher and value is not None else value or 0.0)
                     for value, (_, higher) in zip(values, keys))

    rows.sort(key=lambda run: (score(run), run.name))
    primary = keys[0][0]
    has_best = rows[0].metrics[section].get("test", {}).get(primary) is not None
    header = ["experiment", *(key.removeprefix(prefix) for key in columns), *(f"test.{m}" for m, _ in keys)]
    lines = [f"## {section} ({task}), sorted by test.{primary} then test.{keys[1][0]}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in rows:
        test = run.metrics[section].get("test", {})
        name = f"**{run.name}** (best)" if has_best and score(run) == score(rows[0]) else run.name
        cells = [name, *(_cell(run.params.get(key)) for key in columns),
                 *(_cell(test.get(metric), DIGITS[metric]) for metric, _ in keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def render(runs: list[Run], only: tuple[str, ...] = ()) -> str:
    """The whole comparison: a table per compared params.yaml experiment, then what was left out."""
    finished = [run for run in runs if run.state in FINISHED]
    varied = varied_params(finished)
    chosen = sections(finished, varied, only)
    if not chosen:
        raise CompareError("the varied params (" + ", ".join(varied) + ") belong to no experiment with a metrics "
                           "file; run the sweep's evaluate stages, or name one with --only")
    count = sum(run.state == "success" for run in runs)
    baselines = ", ".join(f"{run.name.removesuffix(' (baseline)')} ({run.rev[:7]})" for run in runs
                          if run.state == "baseline")
    lines = [f"# Sweep: {count} experiment{'s' * (count != 1)} of {baselines}", "",
             "Varied: " + (", ".join(f"`{key}`" for key in varied) or "no params (same params in every row)"), ""]
    for section in chosen:
        lines += table(finished, section, varied)
    pending = [f"{run.name} ({run.state})" for run in runs if run.state not in FINISHED]
    if pending:
        lines += [f"Not compared (not finished): {', '.join(pending)}.", ""]
    return "\n".join(lines)


def exp_show(repo: Path, rev: str | None = None, all_commits: bool = False) -> list[dict]:
    """``dvc exp show --json`` in ``repo``, parsed."""
    dvc = shutil.which("dvc", path=os.path.dirname(sys.executable)) or shutil.which("dvc")
    if dvc is None:
        raise CompareError("dvc not found next to this Python or on PATH; install the project (pip install -e .)")
    command = [dvc, "exp", "show", "--json", *(["--all-commits"] if all_commits else ["--rev", rev or "HEAD"])]
    log.debug("running %s in %s", " ".join(command), repo)
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise CompareError(f"{' '.join(command[1:])} in {repo} failed: {result.stderr.strip() or result.stdout}")
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise CompareError(f"dvc exp show --json gave no JSON ({exc}): {result.stdout[:200]!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cluster.compare", description=__doc__.strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path("."), help="the DVC project (default: here)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--rev", help="baseline commit whose experiments to compare (default: HEAD)")
    which.add_argument("--all-commits", action="store_true", help="the experiments of every commit")
    parser.add_argument("--exp", action="append", default=[], metavar="NAME",
                        help="compare this DVC experiment (repeat for more; default: all of them)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="the params.yaml experiment whose metrics to compare (repeat for more; default: "
                             "those the varied params belong to)")
    parser.add_argument("--out", type=Path, help="write the markdown here (default: stdout)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = parse_exp_show(exp_show(args.repo, args.rev, args.all_commits), tuple(args.exp))
        text = render(runs, tuple(args.only))
    except CompareError as exc:
        log.error("%s", exc)
        return 1
    if args.out:
        atomic.write_text(args.out, text)
        log.info("%d experiments compared in %s", sum(r.state == "success" for r in runs), args.out)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    raise SystemExit(main())
