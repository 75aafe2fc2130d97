"""DVC stage ``evaluate@<experiment>``: test-set metrics, images and plots.

Autoencoders: MSE, BCE, PSNR, SSIM, the seed's Keras "accuracy", the
compression ratio and a PCA baseline PSNR at the same latent size (and, for
denoising, the PSNR of the noisy input). Classifiers: accuracy, loss,
per-class accuracy and the confusion matrix. The same numbers go to
``metrics/<experiment>.json`` (DVC metrics) and to the experiment's MLflow
run (the one train logged into), with the images in
``reports/experiments/<experiment>/``. DVC plots data goes to
``plots/<task>/<experiment>.json`` (the per-epoch curves),
``plots/<task>_test/<experiment>.csv`` (on the test split: an autoencoder's
PSNR at each percentile of its images, a classifier's confusion rows) and
``plots/images/<experiment>.png`` (test reconstructions, or misclassified test
images), so that ``dvc plots diff`` shows them side by side. The model
becomes a version of the registered model named after the experiment,
``@champion`` or ``@challenger`` by the promotion gate (:mod:`stages.promotion`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
from pathlib import Path

from stages.keras_start import keras  # before any other import of Keras: see there
import numpy as np

import stages.recipes  # noqa: F401 - registers the schedules and loss that saved models name
from stages import atomic, cli, corruptions, metrics, params as params_mod, plots
from stages.errors import PipelineError
from stages.experiment_data import Arrays, ExperimentData, split_files
from stages.images import to_unit_float
from stages.mlflow_run import load_run_ref, log_split, tracked_run
from stages.mlflow_store import EXPERIMENTS, failures
from stages.models import latent_shape
from stages.promotion import describe, promote

log = logging.getLogger("stages.evaluate")

GRID_IMAGES = 10
GRID = {"autoencoder": "reconstructions.png", "classifier": "misclassified.png"}  # the grid, as MLflow has it


def predict(model: keras.Model, x_uint8: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Predictions in float32, scaling one batch of uint8 images at a time.

    The output array is allocated once and filled batch by batch (no list of
    parts to concatenate: that held the predictions twice).
    """
    out = None
    for i in range(0, len(x_uint8), batch_size):
        part = np.asarray(model.predict_on_batch(to_unit_float(x_uint8[i:i + batch_size])), dtype=np.float32)
        if out is None:
            out = np.empty((len(x_uint8), *part.shape[1:]), np.float32)
        out[i:i + len(part)] = part
    if out is None:
        raise PipelineError("no test images to predict")
    return out


def csv_text(header: tuple[str, ...], rows) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def psnr_percentiles_csv(per_image_mse: np.ndarray) -> str:
    """The test images' PSNR at each percentile 0..100 (``percentile,psnr_db``): the
    spread behind the mean, worst images first, drawn as one curve per experiment."""
    values = np.percentile(metrics.psnr_of_mse(per_image_mse), np.arange(101))
    return csv_text(("percentile", "psnr_db"), ((p, round(float(v), 4)) for p, v in enumerate(values)))


def confusion_csv(class_names: list[str], matrix) -> str:
    """A confusion matrix as the rows DVC's confusion template counts: one
    ``actual,predicted`` line per test image (rows of the matrix: actual)."""
    if len(matrix) != len(class_names) or any(len(row) != len(class_names) for row in matrix):
        raise ValueError(f"a {len(class_names)}-class confusion matrix must be "
                         f"{len(class_names)}x{len(class_names)}")
    return csv_text(("actual", "predicted"), ((actual, predicted) for actual, row in zip(class_names, matrix)
                                              for predicted, count in zip(class_names, row)
                                              for _ in range(int(count))))


def autoencoder_metrics(exp, data: ExperimentData, test: Arrays, model, folder: Path) -> tuple[dict, str]:
    # targets and inputs stay uint8 (the metrics scale them a chunk at a time);
    # the predictions are the only float copy of the test set, clipped in place
    # once the scores of the raw output are taken
    target, output = test.y, predict(model, test.x)
    latent = latent_shape(exp.model, target.shape[1:])
    train_targets = data.target_images(*exp.data.train_on.split("+"))
    latent_size = int(np.prod(latent))
    denoising = exp.data.input != exp.data.target
    pca_mse = metrics.pca_reconstruction_mse(  # fitted on the train images a linear_path model started from
        train_targets, target, n_components=min(latent_size, target[0].size),
        test_inputs=test.x if denoising else None)
    results = {
        "mse": metrics.mse(target, output),
        "bce": metrics.bce(target, output),
        "keras_accuracy": metrics.keras_accuracy(target, output),
    }
    image = np.clip(output, 0.0, 1.0, out=output)
    image_mse = metrics.mse_per_image(target, image)
    # SSIM keeps only where its 11x11 window fits: none of a smaller (toy) image
    has_ssim = min(target.shape[1:3]) >= metrics.SSIM_WINDOW
    results.update({
        # PSNR two ways: the mean of per-image PSNR, and the PSNR of the pooled MSE
        "psnr": metrics.psnr_from_mse(image_mse),
        "psnr_pooled": metrics.psnr_from_mse(image_mse, pooled=True),
        **({"ssim": metrics.ssim(target, image)} if has_ssim else {}),
        "latent_size": latent_size,
        "compression_ratio": metrics.compression_ratio(target.shape[1:], latent),
        "pca_baseline_psnr": metrics.psnr_from_mse(pca_mse),
        "pca_baseline_psnr_pooled": metrics.psnr_from_mse(pca_mse, pooled=True),
    })
    grid = {"original": target[:GRID_IMAGES]}
    if denoising:
        noisy_mse = metrics.mse_per_image(target, test.x)
        results["psnr_input"] = metrics.psnr_from_mse(noisy_mse)
        results["psnr_input_pooled"] = metrics.psnr_from_mse(noisy_mse, pooled=True)
        if has_ssim:
            results["ssim_input"] = metrics.ssim(target, test.x)
        grid["corrupted input"] = test.x[:GRID_IMAGES]
    grid["reconstruction"] = image[:GRID_IMAGES]
    plots.reconstruction_grid(grid, folder / "reconstructions.png", max_images=GRID_IMAGES)
    return results, psnr_percentiles_csv(image_mse)


def colour_accuracy(images: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    """Accuracy on the test digits of each colour (colored MNIST: the channel each one is in)."""
    channel = corruptions.dominant_channel(images)
    return {f"colour_accuracy.{colour}": float(correct[channel == i].mean())
            for i, colour in enumerate(("red", "green", "blue")) if (channel == i).any()}


def classifier_metrics(exp, data: ExperimentData, test: Arrays, model, folder: Path) -> tuple[dict, str]:
    probabilities = predict(model, test.x)
    labels = test.y
    extra = {}
    if exp.evaluation.flip_tta:  # test-time augmentation: the image and its mirror image, predictions averaged
        extra["accuracy_without_tta"] = float((probabilities.argmax(axis=1) == labels).mean())
        probabilities = (probabilities + predict(model, test.x[:, :, ::-1])) / 2
    predicted = probabilities.argmax(axis=1)
    chosen = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)
    cm = metrics.confusion_matrix(labels, predicted, len(data.class_names))
    per_class = metrics.per_class_accuracy(cm)
    (folder / "confusion.json").write_text(json.dumps({
        "class_names": data.class_names, "confusion_matrix": cm.tolist(),
        "per_class_accuracy": dict(zip(data.class_names, map(float, per_class))),
    }, indent=2) + "\n")
    plots.confusion_matrix_plot(cm, data.class_names, folder / "confusion_matrix.png")
    plots.misclassified_grid(test.x, labels, predicted, data.class_names,
                             folder / "misclassified.png")
    results = {"accuracy": float((predicted == labels).mean()), "loss": float(-np.log(chosen).mean()),
               "min_class_accuracy": float(per_class.min())}
    results.update({f"class_accuracy.{c}": float(a) for c, a in zip(data.class_names, per_class)})
    corruption = data.meta.get("corruption") or {}
    if corruption.get("kind") == "colorize" and corruption.get("mode") == "channel":
        results.update(colour_accuracy(test.x, predicted == labels))
    return {**results, **extra}, confusion_csv(data.class_names, cm)


def gate(name: str, task: str, ref: dict, results: dict, margins: dict) -> None:
    """The promotion gate (:mod:`stages.promotion`) for the active run's model:
    its decision as tags and ``evaluation/promotion.json`` on the run, and one line."""
    import mlflow

    if "model_id" not in ref:
        log.warning("evaluate %s: the model has no MLflow LoggedModel (trained by an older train stage); "
                    "not registered: run train@%s again", name, name)
        return
    decision = promote(name, ref["model_id"], task, results, margins)
    mlflow.set_tags(decision.as_tags())
    mlflow.log_dict(dataclasses.asdict(decision), "evaluation/promotion.json")
    log.info("evaluate %s: %s", name, describe(decision))


def plot_files(plots_dir: Path, task: str, name: str) -> tuple[Path, Path, Path]:
    """The DVC plots of experiment ``name``: its per-epoch curves, its test-split
    plot and its image grid (an autoencoder's reconstructions, a classifier's
    misclassified test images)."""
    return (plots_dir / task / f"{name}.json", plots_dir / f"{task}_test" / f"{name}.csv",
            plots_dir / "images" / f"{name}.png")


def evaluate(name: str, params: params_mod.Params, model_dir: Path, metrics_file: Path,
             reports: Path, plots_dir: Path) -> dict:
    import mlflow

    exp = params_mod.experiment(params, name)
    data = ExperimentData(name, exp)
    ref = load_run_ref(model_dir / "run.json")
    try:
        model = keras.models.load_model(model_dir / "model.keras")
        history = json.loads((model_dir / "history.json").read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{model_dir}: cannot load the trained model ({exc}); run train@{name}") from None
    log.info("evaluate %s: %s on the test split of %s (%s)", name, exp.task, exp.data.input, data.source)
    compute = autoencoder_metrics if exp.task == "autoencoder" else classifier_metrics
    # everything is written under temporary names and renamed only after the
    # MLflow run took it: a failed or killed evaluate leaves no outputs
    with atomic.replacing(reports, directory=True) as staging:
        test = data.split("test")
        results, test_plot = compute(exp, data, test, model, staging)
        results = {key: round(float(value), 6) for key, value in results.items()}
        epochs = len(next(iter(history.values()), []))
        plots.loss_curves(history, staging / "curves.png")
        summary = {"experiment": name, "task": exp.task, "dataset": exp.data.input, "dataset_source": data.source,
                   "epochs": epochs, "test": results}
        if "ssim" in results:
            summary["conventions"] = {"ssim": metrics.SSIM_CONVENTION}
        if "trained" in ref:  # where, with what and how long the model was trained (train's run.json)
            summary["trained"] = ref["trained"]
        records = [{"epoch": i + 1, **{k: v[i] for k, v in history.items()}} for i in range(epochs)]
        with tracked_run(EXPERIMENTS[exp.task], f"evaluate {name}", run_id=ref["run_id"], name=name), \
                failures(f"evaluate {name}"):
            log_split("test", split_files(exp.data.input, exp.data.target, test))
            model_id = ref.get("model_id")  # the metrics go on the LoggedModel too
            mlflow.log_metrics({f"test_{key}": value for key, value in results.items()}, model_id=model_id)
            mlflow.log_artifacts(str(staging), "evaluation")
            mlflow.log_dict(summary, f"evaluation/{metrics_file.name}")
            mlflow.set_tag("evaluated_by", f"evaluate@{name}")
            gate(name, exp.task, ref, results, params.promotion.model_dump())
        atomic.write_text(metrics_file, json.dumps(summary, indent=2) + "\n")
        curves_file, test_plot_file, grid_file = plot_files(plots_dir, exp.task, name)
        atomic.write_text(curves_file, json.dumps(records, indent=2) + "\n")
        atomic.write_text(test_plot_file, test_plot)
        grid_file.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / GRID[exp.task], grid_file)  # a DVC image plot, beside the other plots
    log.info("evaluate %s: %s", name, {k: v for k, v in results.items() if not k.startswith("class_")})
    return summary


def main(argv=None) -> int:
    def configure(parser):
        parser.add_argument("experiment", help="an experiment named under 'experiments' in params.yaml")
        parser.add_argument("--model", type=Path, help="train output folder (default: models/<experiment>)")
        parser.add_argument("--metrics", type=Path, help="metrics file (default: metrics/<experiment>.json)")
        parser.add_argument("--reports", type=Path, help="images folder (default: reports/experiments/<experiment>)")
        parser.add_argument("--plots", type=Path, default=Path("plots"),
                            help="DVC plots folder: writes <task>/<experiment>.json, <task>_test/<experiment>.csv "
                                 "and images/<experiment>.png (default: plots)")

    def body(args):
        name = args.experiment
        params = params_mod.load(args.params)
        task = params_mod.experiment(params, name).task
        outputs = [args.metrics or Path("metrics") / f"{name}.json",
                   args.reports or Path("reports/experiments") / name, *plot_files(args.plots, task, name)]
        evaluate(name, params, args.model or Path("models") / name, *outputs[:2], args.plots)
        return outputs

    return cli.run("evaluate", __doc__, body, configure, argv)


if __name__ == "__main__":
    raise SystemExit(main())
