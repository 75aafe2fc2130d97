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
date. Needs ``data/prepared/<dataset>.npz`` (``dvc repro prepare``).

    python benchmarks/bench_train.py                      # mnist_cae and cifar10_cnn
    python benchmarks/bench_train.py --experiments mnist_cae --fraction 1 --epochs 3
"""

from __future__ import annotations

import argparse
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
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hostinfo import host  # noqa: E402 (benchmarks/, this script's folder)

log = logging.getLogger("bench_train")

EPOCH_LINE = re.compile(r"train \S+: epoch (\d+)/\d+ in ([\d.]+) s")


def machine() -> dict:
    versions = subprocess.run(
        [sys.executable, "-c", "import keras, json; b = keras.backend.backend(); "
         "m = __import__('tensorflow' if b == 'tensorflow' else b); "
         "print(json.dumps({'keras': keras.__version__, 'backend': b, b: m.__version__}))"],
        capture_output=True, text=True, check=True).stdout
    return {**host(), **json.loads(versions)}


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (MiB) and stderr+stdout of one child process."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - started
        output.seek(0)
        text = output.read()
    if process.returncode != 0:
        raise SystemExit(f"bench_train: {' '.join(cmd)} failed ({process.returncode}):\n{text[-3000:]}")
    return elapsed, usage.ru_maxrss // 1024, text


def subset(source: Path, dest: Path, fraction: float) -> dict[str, int]:
    """The first ``fraction`` of every split of a prepared dataset file."""
    from stages.images import DatasetFile, Split, load, save

    data = load(source)
    kept = {name: max(1, int(len(s) * fraction)) for name, s in data.splits.items()}
    splits = {name: Split(s.images[:kept[name]], s.labels[:kept[name]]) for name, s in data.splits.items()}
    counts = {name: len(s) for name, s in splits.items()}
    save(dest, DatasetFile(splits, data.class_names, {**data.meta, "counts": counts}))
    return counts


def ours(name: str, params: dict, data_file: Path, epochs: int, work: Path, env: dict) -> dict:
    """The train and evaluate stages in a scratch project."""
    project = work / "ours"
    shutil.copytree(ROOT / "stages", project / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    exp = params["experiments"][name]
    scratch = {**params, "limits": {"max_epochs": epochs, "max_samples": None}, "experiments": {name: exp}}
    (project / "params.yaml").write_text(yaml.safe_dump(scratch, sort_keys=False))
    for ref in {exp["data"]["input"], exp["data"]["target"]}:
        (project / "data" / ref).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_file, project / "data" / f"{ref}.npz")
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    train_s, train_rss, text = timed([sys.executable, "-m", "stages.train", name], project, env)
    epoch_s = [float(seconds) for _, seconds in EPOCH_LINE.findall(text)]
    evaluate_s, evaluate_rss, _ = timed([sys.executable, "-m", "stages.evaluate", name], project, env)
    return {"epoch_s": epoch_s, "stage_s": train_s, "peak_rss_mib": train_rss, "evaluate_s": evaluate_s,
            "evaluate_peak_rss_mib": evaluate_rss}


# --- the seed scripts, as plain Keras --------------------------------------

def seed_model(name: str, image_shape: tuple[int, ...]):
    """The questions' models, written layer by layer as their scripts do."""
    import keras
    from keras import layers

    inputs = keras.Input(image_shape)
    if name == "mnist_cae":  # 16/8 filters, two poolings, sigmoid output, BCE, Adam
        x = layers.Conv2D(16, 3, activation="relu", padding="same")(inputs)
        x = layers.MaxPooling2D(2, padding="same")(x)
        x = layers.Conv2D(8, 3, activation="relu", padding="same")(x)
        x = layers.MaxPooling2D(2, padding="same")(x)
        x = layers.Conv2D(8, 3, activation="relu", padding="same")(x)
        x = layers.UpSampling2D(2)(x)
        x = layers.Conv2D(16, 3, activation="relu", padding="same")(x)
        x = layers.UpSampling2D(2)(x)
        outputs = layers.Conv2D(image_shape[-1], 3, activation="sigmoid", padding="same")(x)
        model = keras.Model(inputs, outputs)
        model.compile(optimizer="adam", loss="binary_crossentropy")
    elif name == "cifar10_cnn":  # 64 then 256 filters, he_normal, dense 1024, dropout 0.4, Adam
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
    else:
        raise SystemExit(f"bench_train: no seed script for {name!r} (mnist_cae, cifar10_cnn)")
    return model


def seed_run(name: str, data_file: Path, epochs: int, batch_size: int) -> None:
    """One seed script run (in its own process); prints its epoch times as JSON."""
    import keras

    from stages.images import load

    data = load(data_file)
    x_train = np.concatenate([data.splits["train"].images, data.splits["val"].images]).astype("float32") / 255.0
    x_test = data.splits["test"].images.astype("float32") / 255.0
    if name == "mnist_cae":
        y_train, y_test = x_train, x_test
    else:
        y_train = keras.utils.to_categorical(np.concatenate([data.splits["train"].labels,
                                                             data.splits["val"].labels]), 10)
        y_test = keras.utils.to_categorical(data.splits["test"].labels, 10)
    model = seed_model(name, x_train.shape[1:])
    times: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.started)

    model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0,
              validation_data=(x_test, y_test), callbacks=[EpochTimer()])
    print(json.dumps({"epoch_s": times}))


def seed(name: str, data_file: Path, epochs: int, batch_size: int, env: dict) -> dict:
    wall, rss, text = timed([sys.executable, __file__, "--seed-run", name, str(data_file), str(epochs),
                             str(batch_size)], ROOT, env)
    return {**json.loads(text.strip().splitlines()[-1]), "stage_s": wall, "peak_rss_mib": rss}


def summarise(result: dict, images: int) -> dict:
    after_first = result["epoch_s"][1:] or result["epoch_s"]
    median = statistics.median(after_first)
    fastest = min(after_first)
    return {**result, "median_epoch_s": round(median, 2), "images_per_s": round(images / median, 1),
            "fastest_epoch_s": round(fastest, 2), "fastest_images_per_s": round(images / fastest, 1)}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if len(sys.argv) == 6 and sys.argv[1] == "--seed-run":
        seed_run(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", nargs="+", default=["mnist_cae", "cifar10_cnn"])
    parser.add_argument("--fraction", type=float, default=0.2, help="of every split (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=4, help="the first compiles; median over the rest")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_train.json")
    args = parser.parse_args()

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    results = {"machine": machine(), "fraction": args.fraction, "epochs": args.epochs, "experiments": {}}
    log.info("%s", results["machine"])
    for name in args.experiments:
        exp = params["experiments"][name]
        source = ROOT / "data" / f"{exp['data']['input']}.npz"
        if not source.is_file():
            raise SystemExit(f"bench_train: {source} not found; run dvc repro prepare first")
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            work = Path(tmp)
            counts = subset(source, work / "data.npz", args.fraction)
            images = counts["train"] + counts["val"]
            batch = exp["training"]["batch_size"]
            log.info("%s: %d training images, batch %d, %d epochs", name, images, batch, args.epochs)
            seed_result = summarise(seed(name, work / "data.npz", args.epochs, batch, env), images)
            log.info("%s seed: %s", name, seed_result)
            ours_result = summarise(ours(name, params, work / "data.npz", args.epochs, work, env), images)
            log.info("%s ours: %s", name, ours_result)
        results["experiments"][name] = {
            "training_images": images, "batch_size": batch, "seed": seed_result, "ours": ours_result,
            "ratio_images_per_s": round(ours_result["images_per_s"] / seed_result["images_per_s"], 3),
            "ratio_fastest": round(ours_result["fastest_images_per_s"] / seed_result["fastest_images_per_s"], 3)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("| experiment | images/epoch | batch | seed img/s | ours img/s | ours/seed | fastest epoch: ours/seed "
          "| seed epoch | ours epoch | ours stage | ours evaluate | seed peak RSS | ours train / evaluate peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results["experiments"].items():
        s, o = r["seed"], r["ours"]
        print(f"| `{name}` | {r['training_images']:,} | {r['batch_size']} | {s['images_per_s']:,.0f} | "
              f"{o['images_per_s']:,.0f} | {r['ratio_images_per_s']:.2f}x | {r['ratio_fastest']:.2f}x | "
              f"{s['median_epoch_s']:.1f} s | "
              f"{o['median_epoch_s']:.1f} s | {o['stage_s']:.1f} s | {o['evaluate_s']:.1f} s | "
              f"{s['peak_rss_mib']} MiB | {o['peak_rss_mib']} / {o['evaluate_peak_rss_mib']} MiB |")
    log.info("results in %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
