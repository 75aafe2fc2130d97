"""Benchmark: how training cost grows with the batch size and with the data.

For one experiment's model, compiled exactly as the train stage compiles it
(``stages.training.compiled_model``), on the images of its prepared dataset scaled to
[0, 1] as the stage scales them:

* throughput against batch size: training images/s of one epoch over
  ``--images`` images at each ``--batches`` size (after a warm-up epoch at
  that size, which compiles);
* time against dataset size: the seconds of one epoch at the experiment's
  own batch size over each of ``--sizes`` images (after one warm-up epoch).

Each point is the median of ``--repeats`` epochs. Writes
``benchmarks/results/bench_scaling-<experiment>-<backend>.json`` and a
two-panel plot (``--plot``, default ``docs/img/scaling-<experiment>-<backend>.png``),
with the machine, backend, versions and date. On a GPU, run it with
``KERAS_BACKEND=jax``.

    python -m benchmarks.bench_scaling --experiment mnist_cae
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.harness import ROOT, machine, write_results  # noqa: E402
from stages import params as params_mod  # noqa: E402
from stages.experiment_data import ExperimentData  # noqa: E402
from stages.images import to_unit_float  # noqa: E402
from stages.training import compiled_model, configure_backend  # noqa: E402

log = logging.getLogger("bench_scaling")


def epoch_seconds(model, x, y, batch_size: int, repeats: int) -> float:
    """Median wall time of ``repeats`` training epochs over (x, y), after a warm-up epoch."""
    model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def fitted_line(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares ``seconds = fixed + per_image * size``; returns (fixed, per_image)."""
    per_image, fixed = np.polyfit(np.asarray(sizes, float), np.asarray(seconds, float), 1)
    return float(fixed), float(per_image)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    batches = result["throughput_by_batch"]
    left.plot([b["batch_size"] for b in batches], [b["images_per_s"] for b in batches], "o-")
    left.set(xscale="log", xlabel="batch size", ylabel="training images/s",
             title=f"{result['experiment']}: throughput vs batch size")
    left.set_xticks([b["batch_size"] for b in batches], [str(b["batch_size"]) for b in batches])
    left.minorticks_off()
    left.set_ylim(bottom=0)
    sizes = result["time_by_size"]
    xs = [s["images"] for s in sizes]
    right.plot(xs, [s["seconds"] for s in sizes], "o", label="measured")
    fixed, per_image = result["fit"]["fixed_s"], result["fit"]["per_image_s"]
    right.plot([0, max(xs)], [fixed, fixed + per_image * max(xs)], "--",
               label=f"{fixed:.2f} s + {1e3 * per_image:.3f} ms/image")
    right.set(xlabel="images in the epoch", ylabel="epoch seconds",
              title=f"epoch time vs data (batch {result['batch_size']})")
    right.set_ylim(bottom=0)
    right.legend()
    fig.suptitle(f"{result['machine']['cpu']}, {result['machine']['cores']} cores, Keras {result['machine']['keras']} "
                 f"on {result['machine']['backend']}, {result['machine']['date']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="mnist_cae")
    parser.add_argument("--images", type=int, default=8192, help="images per epoch for the batch-size sweep")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()

    os.chdir(ROOT)
    measured_on = machine()  # before this process claims an accelerator: it asks a fresh interpreter
    exp = params_mod.experiment(params_mod.load(), args.experiment)
    data = ExperimentData(args.experiment, exp)
    train, _ = data.training()
    count = max(args.images, *args.sizes)
    if count > len(train):
        raise SystemExit(f"bench_scaling: {args.experiment} has {len(train)} training images, {count} asked for")
    x = to_unit_float(train.x[:count])
    y = to_unit_float(train.y[:count]) if exp.task == "autoencoder" else train.y[:count]
    configure_backend(exp.training.seed, exp.training.mixed_precision)

    def model_for(batch_size: int, images: int):
        steps = math.ceil(images / batch_size)
        return compiled_model(args.experiment, exp, x.shape[1:], len(data.class_names), steps, 1,
                              train.y[:count] if exp.task == "autoencoder" else None)  # a linear_path's PCA

    backend = keras.backend.backend()
    result = {"experiment": args.experiment, "batch_size": exp.training.batch_size, "repeats": args.repeats,
              "machine": measured_on, "throughput_by_batch": [], "time_by_size": []}
    for batch_size in args.batches:
        seconds = epoch_seconds(model_for(batch_size, args.images), x[:args.images], y[:args.images], batch_size,
                                args.repeats)
        result["throughput_by_batch"].append({"batch_size": batch_size, "seconds": round(seconds, 3),
                                              "images_per_s": round(args.images / seconds, 1)})
        log.info("batch %5d: %.1f images/s", batch_size, args.images / seconds)
    model = model_for(exp.training.batch_size, max(args.sizes))
    for size in args.sizes:
        seconds = epoch_seconds(model, x[:size], y[:size], exp.training.batch_size, args.repeats)
        result["time_by_size"].append({"images": size, "seconds": round(seconds, 3)})
        log.info("%6d images: %.2f s an epoch", size, seconds)
    fixed, per_image = fitted_line([s["images"] for s in result["time_by_size"]],
                                   [s["seconds"] for s in result["time_by_size"]])
    result["fit"] = {"fixed_s": round(fixed, 3), "per_image_s": per_image}
    out = write_results(result, f"bench_scaling-{args.experiment}-{backend}")
    figure = args.plot or ROOT / "docs" / "img" / f"scaling-{args.experiment}-{backend}.png"
    plot(result, figure)
    log.info("wrote %s and %s", out.relative_to(ROOT), figure.relative_to(ROOT) if figure.is_relative_to(ROOT)
             else figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
