"""Benchmark: the train and evaluate stages against the seed's plain Keras script.

For each experiment, in one run on one machine, each in a fresh process:
  * ours: ``python -m stages.train`` then ``python -m stages.evaluate`` in a
    scratch project, as DVC runs them (MLflow logging to a scratch SQLite
    store, per-epoch checkpoint, validation pass);
  * the seed: the question's plain Keras script for the same model, batch
    size, data and epochs: ``x.astype('float32') / 255`` up front, one
    ``model.fit(..., shuffle=True, validation_data=...)``.
Both train on the same images (the prepared dataset, a ``--fraction`` of
each split so that CPU runs stay short) and validate on the same test split.
Printed and saved (benchmarks/results/bench_train.json): training images/s
(median over the epochs after the first, which compiles; and from the
fastest of them, less sensitive to a noisy shared machine), the median epoch
time, the stage's wall time, evaluate's wall time, each process's peak
resident memory, and the ratio ours/seed, with machine, backend, versions and
date. Needs ``data/prepared/<dataset>.npz`` (``dvc repro prepare``), and the
corrupted file for experiments that train on one.

``--interleave`` measures the ratio on a shared machine whose speed drifts
from minute to minute: the seed's script and our train stage start side by
side and take turns, one epoch each (the order alternating every round, so
a steady drift cancels), and the ratio is taken round by round from epochs
that ran seconds apart. The first round (compiling, the other process still
starting) and the last (each process's exit work) are left out. The stage
waits for its turn as each epoch begins (a callback added to the callbacks
it gives ``Model.fit``; everything else is the stage as DVC runs it), so a
turn holds all its per-epoch work: the epoch (its batches scaled as they
are drawn), the validation pass, the checkpoint and the MLflow batch.

    python -m benchmarks.bench_train                      # mnist_cae and cifar10_cnn
    python -m benchmarks.bench_train --experiments mnist_cae --fraction 1 --epochs 3
    python -m benchmarks.bench_train --interleave --epochs 10 --experiments mnist_denoise
    python -m benchmarks.bench_train --interleave --set training.mixed_precision=true   # bf16 for ours
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import (ROOT, apply_overrides, child_env, load_params, machine, scratch_project, timed,
                                write_results)

log = logging.getLogger("bench_train")

# the stage's line per epoch: the epoch (fit and validation), then what it does
# after it: the checkpoint and the MLflow batch (those two absent from older stages' lines)
EPOCH_LINE = re.compile(r"train \S+: epoch (\d+)/\d+ in ([\d.]+) s"
                        r"(?: \(then checkpoint ([\d.]+) s, tracking ([\d.]+) s(?:, images ([\d.]+) s)?\))?")
DEVICE_PEAK_LINE = re.compile(r"train \S+: peak device memory (\d+) MiB")


def after_epoch(lines: list[tuple[str, ...]]) -> dict[str, list[float]]:
    """Wall seconds of the checkpoint, of the MLflow batch and of the MLflow
    images after each epoch, from the stage's ``EPOCH_LINE`` matches (empty
    lists for older stages; images 0 where the stage logs none)."""
    timed_lines = [line for line in lines if line[2]]
    return {"checkpoint_s": [float(line[2]) for line in timed_lines],
            "tracking_s": [float(line[3]) for line in timed_lines],
            "images_s": [float(line[4] or 0) for line in timed_lines]}


def with_overrides(params: dict, names: list[str], overrides: list[str]) -> dict:
    """``params`` with every ``KEY=VALUE`` of ``overrides`` set in each named
    experiment (KEY relative to it, e.g. ``training.mixed_precision=true``;
    VALUE read as YAML), validated as the stages validate params.yaml: what
    ours runs with. The seed scripts are plain Keras and take none of them."""
    from stages import params as params_mod  # pydantic only, no Keras
    changed = apply_overrides(copy.deepcopy(params),
                              [f"experiments.{name}.{item}" for item in overrides for name in names], new_keys=True)
    try:
        params_mod.parse(changed)
    except params_mod.ParamsError as exc:
        raise ValueError(f"--set {' '.join(overrides)}: {exc}") from None
    return changed


def subset(source: Path, dest: Path, fraction: float) -> dict[str, int]:
    """The first ``fraction`` of every split of a prepared dataset file."""
    from stages.images import DatasetFile, Split, load, save

    data = load(source)
    kept = {name: max(1, int(len(s) * fraction)) for name, s in data.splits.items()}
    splits = {name: Split(s.images[:kept[name]], s.labels[:kept[name]]) for name, s in data.splits.items()}
    counts = {name: len(s) for name, s in splits.items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    save(dest, DatasetFile(splits, data.class_names, {**data.meta, "counts": counts}))
    return counts


def data_files(exp: dict, work: Path, fraction: float) -> tuple[dict[str, Path], dict[str, int]]:
    """The subsets of the experiment's input and target files (one file when
    they are the same), keyed by their refs, and the input's split sizes."""
    files, counts = {}, {}
    for ref in dict.fromkeys([exp["data"]["input"], exp["data"]["target"]]):
        source = ROOT / "data" / f"{ref}.npz"
        if not source.is_file():
            raise SystemExit(f"bench_train: {source} not found; run dvc repro first (prepare, corrupt)")
        files[ref] = work / "data" / f"{ref}.npz"
        split_sizes = subset(source, files[ref], fraction)
        counts = counts or split_sizes
    return files, counts


def ours_project(name: str, params: dict, files: dict[str, Path], epochs: int, work: Path) -> Path:
    """A scratch project holding the one experiment, capped at ``epochs``, and its data files."""
    scratch = {**params, "limits": {"max_epochs": epochs, "max_samples": None},
               "experiments": {name: params["experiments"][name]}}
    project = scratch_project(work / "ours", scratch)
    for ref, path in files.items():
        (project / "data" / ref).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, project / "data" / f"{ref}.npz")
    return project


def ours(name: str, params: dict, files: dict[str, Path], epochs: int, work: Path, env: dict,
         evaluate: bool = True) -> dict:
    """The train and (unless not ``evaluate``) evaluate stages in a scratch project."""
    project = ours_project(name, params, files, epochs, work)
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    train_s, train_rss, text = timed([sys.executable, "-m", "stages.train", name], project, env)
    lines = EPOCH_LINE.findall(text)
    epoch_s = [float(line[1]) for line in lines]
    device_peak = DEVICE_PEAK_LINE.findall(text)
    evaluate_s = evaluate_rss = None
    if evaluate:
        evaluate_s, evaluate_rss, _ = timed([sys.executable, "-m", "stages.evaluate", name], project, env)
    return {"epoch_s": epoch_s, **after_epoch(lines), "stage_s": train_s, "peak_rss_mib": train_rss,
            "evaluate_s": evaluate_s, "evaluate_peak_rss_mib": evaluate_rss,
            "device_peak_mib": int(device_peak[-1]) if device_peak else None,
            "history": json.loads((project / "models" / name / "history.json").read_text())}


# --- the seed scripts, as plain Keras --------------------------------------

def seed_scripts(params: dict) -> dict[str, str]:
    """Each experiment a seed script trains, with the seed question's
    experiment whose script it is: every experiment that quotes a seed's
    figure (``seed_figure``) has its question's script, and an experiment of
    the same model, loss and optimizer shares it (``fashion_mnist_cae`` is
    ``mnist_cae``'s script on other data)."""
    experiments = params["experiments"]

    def compiled(exp: dict) -> tuple:
        return exp["task"], exp["model"], exp["training"]["loss"], exp["training"]["optimizer"]

    seeds = [name for name, exp in experiments.items() if exp.get("seed_figure")]
    scripts = {name: name for name in seeds}
    for name, exp in experiments.items():
        seed = next((seed for seed in seeds if compiled(experiments[seed]) == compiled(exp)), None)
        if seed is not None:
            scripts.setdefault(name, seed)
    return scripts


def seed_model(seed: str, image_shape: tuple[int, ...]):
    """The questions' models, written layer by layer as their scripts do
    (``seed``: the question's experiment, a value of :func:`seed_scripts`)."""
    import keras
    from keras import layers

    def conv(filters, **kwargs):
        return layers.Conv2D(filters, 3, activation="relu", padding="same", **kwargs)

    inputs = keras.Input(image_shape)
    if seed in ("mnist_cae", "mnist_denoise"):  # two poolings, sigmoid output, BCE, Adam
        outer, inner = (16, 8) if seed == "mnist_cae" else (32, 32)  # mnist_denoise: 32 filters throughout
        x = layers.MaxPooling2D(2, padding="same")(conv(outer)(inputs))
        x = layers.MaxPooling2D(2, padding="same")(conv(inner)(x))
        x = layers.UpSampling2D(2)(conv(inner)(x))
        x = layers.UpSampling2D(2)(conv(outer)(x))
        outputs = layers.Conv2D(image_shape[-1], 3, activation="sigmoid", padding="same")(x)
        model = keras.Model(inputs, outputs)
        model.compile(optimizer="adam", loss="binary_crossentropy")
    elif seed in ("cifar10_cae_4pool", "cifar10_cae_3pool"):  # 64-32-16-8, linear output, MSE, "accuracy"
        four = seed == "cifar10_cae_4pool"
        x = layers.MaxPooling2D(2)(conv(64)(inputs))
        x = layers.MaxPooling2D(2)(conv(32)(x))
        x = conv(16)(x)
        if four:  # the answer removed this pooling (and the decoder's last upsampling)
            x = layers.MaxPooling2D(2)(x)
        x = layers.MaxPooling2D(2)(conv(8)(x))
        x = layers.UpSampling2D(2)(conv(8)(x))
        x = layers.UpSampling2D(2)(conv(16)(x))
        x = layers.UpSampling2D(2)(conv(32)(x))
        x = conv(64)(x)
        if four:
            x = layers.UpSampling2D(2)(x)
        outputs = layers.Conv2D(image_shape[-1], 3, padding="same")(x)
        model = keras.Model(inputs, outputs)
        model.compile(optimizer="adam", loss="mse", metrics=["accuracy"])
    elif seed == "cifar10_cnn":  # 64 then 256 filters, he_normal, dense 1024, dropout 0.4, Adam
        x = layers.Conv2D(64, 3, activation="relu", kernel_initializer="he_normal")(inputs)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Conv2D(256, 2, activation="relu", kernel_initializer="he_normal")(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Flatten()(x)
        x = layers.Dense(1024, activation="relu")(x)
        x = layers.Dropout(0.4)(x)
        outputs = layers.Dense(10, activation="softmax")(x)
        model = keras.Model(inputs, outputs)
        model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    elif seed in ("colored_mnist_cnn", "colored_mnist_cnn_broken"):  # 64-64 convs, RMSprop
        fixed = seed == "colored_mnist_cnn"  # the answer: ReLU in the convs, none before the softmax
        activation = "relu" if fixed else None
        x = layers.MaxPooling2D(2)(layers.Conv2D(64, 3, padding="same", activation=activation)(inputs))
        x = layers.MaxPooling2D(2, padding="same")(layers.Conv2D(64, 3, padding="same", activation=activation)(x))
        x = layers.Dense(10, activation=None if fixed else "relu")(layers.Flatten()(x))
        model = keras.Model(inputs, layers.Softmax()(x))
        model.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])
    else:
        raise SystemExit(f"bench_train: no seed script for {seed!r}")
    return model


def seed_run(seed: str, input_file: Path, target_file: Path, epochs: int, batch_size: int) -> None:
    """One run of ``seed``'s script (in its own process); prints its epoch times as JSON."""
    import keras

    from stages.images import load

    def images(data, *splits):
        return np.concatenate([data.splits[s].images for s in splits]).astype("float32") / 255.0

    inputs, targets = load(input_file), load(target_file)
    x_train, x_test = images(inputs, "train", "val"), images(inputs, "test")
    model = seed_model(seed, x_train.shape[1:])
    if model.loss == "categorical_crossentropy":  # a classifier: one-hot labels, as the questions' scripts have them
        y_train = keras.utils.to_categorical(np.concatenate([targets.splits["train"].labels,
                                                             targets.splits["val"].labels]), 10)
        y_test = keras.utils.to_categorical(targets.splits["test"].labels, 10)
    elif input_file == target_file:
        y_train, y_test = x_train, x_test
    else:
        y_train, y_test = images(targets, "train", "val"), images(targets, "test")
    turns = Turns.from_env()
    times: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            turns.next()
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.started)

    model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0,
              validation_data=(x_test, y_test), callbacks=[EpochTimer()])
    from stages.distribution import device_peak_mib

    peak = device_peak_mib()
    print(json.dumps({"epoch_s": times, "device_peak_mib": None if peak is None else round(peak)}), flush=True)


def seed(seed: str, files: list[Path], epochs: int, batch_size: int, env: dict) -> dict:
    wall, rss, text = timed(seed_command(seed, files, epochs, batch_size), ROOT, env)
    return {**json.loads(text.strip().splitlines()[-1]), "stage_s": wall, "peak_rss_mib": rss}


def seed_command(seed: str, files: list[Path], epochs: int, batch_size: int) -> list[str]:
    input_file, target_file = files[0], files[-1]
    return [sys.executable, "-m", "benchmarks.bench_train", "--seed-run", seed, str(input_file), str(target_file),
            str(epochs), str(batch_size)]


# --- turn taking (--interleave) ----------------------------------------------

TURNS_ENV = "BENCH_TRAIN_TURNS"


class Turns:
    """A child's side of turn taking: :meth:`next` ends the turn it holds (if
    any) and blocks until the controller gives it the next one. Without the
    environment variable (a plain run) it does nothing."""

    def __init__(self, go: int | None, done: int | None):
        self.go, self.done, self.holding = go, done, False

    @classmethod
    def from_env(cls) -> "Turns":
        fds = os.environ.get(TURNS_ENV)
        return cls(*map(int, fds.split(","))) if fds else cls(None, None)

    def next(self) -> None:
        if self.go is None:
            return
        if self.holding:
            os.write(self.done, b".")
        if os.read(self.go, 1) != b".":
            raise SystemExit("bench_train: the controller went away")
        self.holding = True


def spawn_with_turns(cmd: list[str], cwd: Path, env: dict, output) -> tuple[subprocess.Popen, int, int]:
    """Start a child that takes turns; return it with the controller's ends of its pipes."""
    go_read, go_write = os.pipe()
    done_read, done_write = os.pipe()
    process = subprocess.Popen(cmd, cwd=cwd, env={**env, TURNS_ENV: f"{go_read},{done_write}"},
                               pass_fds=(go_read, done_write), stdout=output, stderr=subprocess.STDOUT, text=True)
    os.close(go_read)
    os.close(done_write)
    return process, go_write, done_read


def stat_cpu_seconds(stat: Path) -> float | None:
    """User + system CPU seconds from a ``/proc`` ``stat`` file (a process's,
    all its threads, or one thread's under ``task/``); None if it is gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    return stat_cpu_seconds(Path(f"/proc/{pid}/stat"))


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each kind of thread of a live process,
    by the thread's name with its trailing number dropped (``tf_data_private_threadpool``,
    ``python``...): where a process spends its CPU. Threads gone are not counted."""
    kinds: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = re.sub(r"[-_ ]?\d+$", "", (task / "comm").read_text().strip()) or "?"
        except OSError:
            continue
        seconds = stat_cpu_seconds(task / "stat")
        if seconds is not None:
            kinds[name] = kinds.get(name, 0.0) + seconds
    return kinds


def thread_use(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each kind of thread used between two :func:`thread_cpu` readings."""
    return {name: round(after[name] - before.get(name, 0.0), 3) for name in after
            if after[name] - before.get(name, 0.0) > 0}


def take_turns(children: dict[str, tuple[int, int, int]], rounds: int) -> dict[str, dict[str, list]]:
    """Give each child (name: go pipe, done pipe, pid) one turn a round,
    alternating the order every round (A B, B A, A B, ...); return each
    child's turns: wall seconds, the CPU seconds its process used in them
    (None where unknown) and those by kind of thread (:func:`thread_cpu`).
    A turn ends when the child asks for the next one or exits (its pipe
    closes); a child that exits is given no more turns."""
    names = list(children)
    turns: dict[str, dict[str, list]] = {name: {"wall": [], "cpu": [], "threads": []} for name in names}
    finished: set[str] = set()
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            if name in finished:
                continue
            go, done, pid = children[name]
            cpu_before, threads_before = cpu_seconds(pid), thread_cpu(pid)
            started = time.perf_counter()
            try:
                os.write(go, b".")
            except BrokenPipeError:
                finished.add(name)
                continue
            answer = os.read(done, 1)
            turns[name]["wall"].append(time.perf_counter() - started)
            cpu_after = cpu_seconds(pid)
            turns[name]["cpu"].append(None if None in (cpu_before, cpu_after) else cpu_after - cpu_before)
            turns[name]["threads"].append(thread_use(threads_before, thread_cpu(pid)))
            log.info("round %d: %s %.2f s", round_, name, turns[name]["wall"][-1])
            if answer != b".":
                finished.add(name)
    return turns


def paired(seed_s: list[float], ours_s: list[float]) -> dict:
    """Round-by-round ratio ours/seed in images/s (seed time over ours),
    leaving out the first round (compiling, start-up) and the last (exit work)."""
    rounds = min(len(seed_s), len(ours_s))
    if rounds < 3:
        raise SystemExit(f"bench_train: --interleave needs at least 3 epochs, got {rounds} rounds")
    kept = range(1, rounds - 1)
    ratios = [seed_s[i] / ours_s[i] for i in kept]
    return {"rounds_used": len(ratios), "ratios": [round(r, 3) for r in ratios],
            "median_ratio": round(statistics.median(ratios), 3),
            "min_ratio": round(min(ratios), 3), "max_ratio": round(max(ratios), 3),
            "total_ratio": round(sum(seed_s[i] for i in kept) / sum(ours_s[i] for i in kept), 3),
            "seed_median_s": round(statistics.median(seed_s[i] for i in kept), 2),
            "ours_median_s": round(statistics.median(ours_s[i] for i in kept), 2)}


def ours_run(name: str) -> int:
    """Our train stage, as ``python -m stages.train NAME`` runs it, with a
    turn taken as each epoch begins (a callback put first into the stage's
    one ``Model.fit``), as the seed's script takes it: a turn holds an epoch
    and the stage's work at its end (checkpoint, MLflow batch).
    Run with ``python -m`` in the scratch project, its ``stages`` come first."""
    import keras

    turns = Turns.from_env()
    fit = keras.Model.fit

    class Turn(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            turns.next()

    def fit_in_turns(self, *args, **kwargs):
        return fit(self, *args, **{**kwargs, "callbacks": [Turn(), *(kwargs.get("callbacks") or [])]})

    keras.Model.fit = fit_in_turns
    from stages import train

    return train.main([name])


def interleaved(name: str, script: str, params: dict, files: dict[str, Path], epochs: int, batch: int, work: Path,
                env: dict) -> dict:
    """The seed's script (``script``) and our train stage side by side, an epoch each in turn."""
    project = ours_project(name, params, files, epochs, work)
    ours_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    commands = {"seed": (seed_command(script, list(files.values()), epochs, batch), ROOT, env),
                "ours": ([sys.executable, "-m", "benchmarks.bench_train", "--ours-run", name], project, ours_env)}
    outputs, processes, children = {}, {}, {}
    try:
        for who, (cmd, cwd, its_env) in commands.items():
            outputs[who] = tempfile.TemporaryFile("w+")
            processes[who], go, done = spawn_with_turns(cmd, cwd, its_env, outputs[who])
            children[who] = (go, done, processes[who].pid)
        turns = take_turns(children, epochs)
    finally:
        for go, done, _ in children.values():
            os.close(go)
            os.close(done)
        usage = {who: os.wait4(p.pid, 0) for who, p in processes.items()}
    result = {}
    for who, (_, status, rusage) in usage.items():
        outputs[who].seek(0)
        text = outputs[who].read()
        outputs[who].close()
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"bench_train: {who} failed:\n{text[-3000:]}")
        result[who] = {"turn_s": [round(t, 3) for t in turns[who]["wall"]],
                       "turn_cpu_s": [None if t is None else round(t, 2) for t in turns[who]["cpu"]],
                       "threads_median_cpu_s": threads_median(turns[who]["threads"]),
                       "peak_rss_mib": rusage.ru_maxrss // 1024}
        if who == "ours":  # inside its turns
            result[who].update(after_epoch(EPOCH_LINE.findall(text)))
    result["wall"] = paired(turns["seed"]["wall"], turns["ours"]["wall"])
    if None not in turns["seed"]["cpu"][:-1] + turns["ours"]["cpu"][:-1]:
        result["cpu"] = paired(turns["seed"]["cpu"], turns["ours"]["cpu"])
    return result


def threads_median(turns: list[dict[str, float]]) -> dict[str, float]:
    """Each kind of thread's median CPU seconds a turn over the rounds
    :func:`paired` keeps (0 in a turn where it did not run), largest first."""
    kept = turns[1:-1] or turns
    names = {name for turn in kept for name in turn}
    medians = {name: round(statistics.median(turn.get(name, 0.0) for turn in kept), 3) for name in names}
    return dict(sorted(medians.items(), key=lambda item: -item[1]))


def summarise(result: dict, images: int) -> dict:
    after_first = result["epoch_s"][1:] or result["epoch_s"]
    median = statistics.median(after_first)
    fastest = min(after_first)
    return {**result, "median_epoch_s": round(median, 2), "images_per_s": round(images / median, 1),
            "fastest_epoch_s": round(fastest, 2), "fastest_images_per_s": round(images / fastest, 1)}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if len(sys.argv) == 7 and sys.argv[1] == "--seed-run":
        seed_run(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "--ours-run":
        return ours_run(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scripts = seed_scripts(load_params())
    parser.add_argument("--experiments", nargs="+", default=["mnist_cae", "cifar10_cnn"],
                        help=f"any of {', '.join(scripts)} (default: %(default)s)")
    parser.add_argument("--fraction", type=float, default=0.2, help="of every split (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=4, help="the first compiles; median over the rest")
    parser.add_argument("--interleave", action="store_true",
                        help="seed and ours side by side, taking turns epoch by epoch (ratio only)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change each experiment for ours only, e.g. training.mixed_precision=true "
                             "(repeatable; the seed scripts stay plain float32 Keras)")
    parser.add_argument("--ours-only", action="store_true",
                        help="skip the seed's script (no ratio): for comparing --set options with each other")
    parser.add_argument("--train-only", action="store_true", help="skip our evaluate stage")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/bench_train[_interleaved].json")
    args = parser.parse_args()
    if args.ours_only and args.interleave:
        parser.error("--ours-only has no seed to interleave with")
    unknown = [name for name in args.experiments if name not in scripts]
    if unknown:
        parser.error(f"no seed script for {', '.join(unknown)} (choose from {', '.join(scripts)})")

    try:
        params = with_overrides(load_params(), args.experiments, args.overrides)
    except ValueError as exc:
        parser.error(str(exc))
    env = child_env()  # ours runs in a scratch project, and imports this package there
    env.pop("MLFLOW_TRACKING_URI", None)
    results = {"machine": machine(), "fraction": args.fraction, "epochs": args.epochs,
               "interleave": args.interleave, "ours_overrides": args.overrides, "experiments": {}}
    log.info("%s", results["machine"])
    for name in args.experiments:
        exp = params["experiments"][name]
        batch = exp["training"]["batch_size"]
        epochs = min(args.epochs, exp["training"]["epochs"])  # the stage trains no more than its params say
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            work = Path(tmp)
            files, counts = data_files(exp, work, args.fraction)
            images = counts["train"] + counts["val"]
            log.info("%s: %d training images, batch %d, %d epochs", name, images, batch, epochs)
            if args.interleave:
                result = interleaved(name, scripts[name], params, files, epochs, batch, work, env)
                log.info("%s interleaved: %s", name, result)
                results["experiments"][name] = {"training_images": images, "batch_size": batch, "epochs": epochs,
                                                **result}
                continue
            seed_result = None
            if not args.ours_only:
                seed_result = summarise(seed(scripts[name], list(files.values()), epochs, batch, env), images)
                log.info("%s seed: %s", name, seed_result)
            ours_result = summarise(ours(name, params, files, epochs, work, env, not args.train_only), images)
            log.info("%s ours: %s", name, ours_result)
        results["experiments"][name] = {
            "training_images": images, "batch_size": batch, "epochs": epochs, "seed": seed_result, "ours": ours_result,
            "ratio_images_per_s": seed_result and round(ours_result["images_per_s"] / seed_result["images_per_s"], 3),
            "ratio_fastest": seed_result and round(ours_result["fastest_images_per_s"]
                                                   / seed_result["fastest_images_per_s"], 3)}
    out = write_results(results, f"bench_train{'_interleaved' if args.interleave else ''}", args.out)
    if args.overrides:
        print(f"ours with: {', '.join(args.overrides)}")
    print(interleaved_table(results) if args.interleave else table(results))
    log.info("results in %s", out)
    return 0


def interleaved_table(results: dict) -> str:
    lines = ["| experiment | images/epoch | batch | rounds used | epoch wall, seed / ours (median) "
             "| ours/seed img/s: median round | range | all rounds "
             "| epoch CPU s, seed / ours (median) | ours/seed images per CPU-s: median round | range "
             "| peak RSS seed / ours |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results["experiments"].items():
        w, c = r["wall"], r.get("cpu")
        cpu = (f"{c['seed_median_s']:.1f} / {c['ours_median_s']:.1f} s | {c['median_ratio']:.3f}x | "
               f"{c['min_ratio']:.3f}-{c['max_ratio']:.3f}x") if c else "n/a | n/a | n/a"
        lines.append(f"| `{name}` | {r['training_images']:,} | {r['batch_size']} | {w['rounds_used']} | "
                     f"{w['seed_median_s']:.2f} / {w['ours_median_s']:.2f} s | "
                     f"{w['median_ratio']:.3f}x | {w['min_ratio']:.3f}-{w['max_ratio']:.3f}x | "
                     f"{w['total_ratio']:.3f}x | {cpu} | "
                     f"{r['seed']['peak_rss_mib']:,} / {r['ours']['peak_rss_mib']:,} MiB |")
    return "\n".join(lines)


def table(results: dict) -> str:
    lines = ["| experiment | images/epoch | batch | seed img/s | ours img/s | ours/seed "
             "| fastest epoch: ours/seed | seed epoch | ours epoch | ours stage | ours evaluate | seed peak RSS "
             "| ours train / evaluate peak RSS | device peak, seed / ours |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def mib(value) -> str:
        return "n/a" if value is None else f"{value:,} MiB"

    for name, r in results["experiments"].items():
        s, o = r["seed"] or {}, r["ours"]
        ratio = (f"{r['ratio_images_per_s']:.2f}x | {r['ratio_fastest']:.2f}x" if s else "n/a | n/a")
        lines.append(
            f"| `{name}` | {r['training_images']:,} | {r['batch_size']} | "
            f"{format(s['images_per_s'], ',.0f') if s else 'n/a'} | {o['images_per_s']:,.0f} | {ratio} | "
            f"{format(s['median_epoch_s'], '.2f') + ' s' if s else 'n/a'} | {o['median_epoch_s']:.2f} s | "
            f"{o['stage_s']:.1f} s | {'n/a' if o['evaluate_s'] is None else format(o['evaluate_s'], '.1f') + ' s'} | "
            f"{mib(s.get('peak_rss_mib'))} | {o['peak_rss_mib']:,} / {mib(o['evaluate_peak_rss_mib'])} | "
            f"{mib(s.get('device_peak_mib'))} / {mib(o.get('device_peak_mib'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
