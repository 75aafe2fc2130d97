"""DVC stage ``report``: every experiment side by side, with the seeds' figures.

Reads ``metrics/<experiment>.json``, the images in ``reports/experiments/<experiment>/``
and ``plots/images/<experiment>.png``, ``models/<experiment>/run.json`` and each experiment's description and seed
figure from ``params.yaml``; writes ``reports/summary.md`` and
``reports/index.html`` (self-contained: images embedded as data URIs).

Experiments are comparable when they read the same input and predict the same
target: autoencoders are ranked within such a group by test PSNR (the mean of
per-image PSNR), beside the PCA baseline at the same latent size, and
classifiers by test accuracy; the best of each group of two or more is marked.
An experiment that names the seed experiment it ``improves_on`` gets a "vs
seed" column: its PSNR (dB) or accuracy (points) minus the seed model's.

Both pages are logged to one MLflow run in the experiment ``pipeline``, which
groups the experiments' runs: it is tagged ``run.<experiment>`` with each
run id, and each experiment run is tagged ``pipeline_run_id`` with its id.
"""

from __future__ import annotations

import base64
import html
import logging
from dataclasses import dataclass, field
from pathlib import Path

from stages import atomic, cli, metrics, params as params_mod
from stages.errors import PipelineError
from stages.mlflow_run import load_run_ref, run_tags, tracked_run
from stages.mlflow_store import describe_failure, failures

log = logging.getLogger("stages.report")

PIPELINE_EXPERIMENT = "pipeline"
PENDING = Path("checkpoints/.report-run.json")  # the open report run, for reaping it after a kill -9
AE_IMAGES = ("curves.png",)  # evaluate's, in reports/experiments/<experiment>/
CLF_IMAGES = ("confusion_matrix.png", "curves.png")
GRIDS = {"autoencoder": "reconstructions", "classifier": "misclassified"}  # plots/images/<experiment>.png


@dataclass
class Row:
    name: str
    task: str
    description: str
    seed_figure: str | None
    dataset: str          # input -> target dataset files ("prepared/mnist" when they are the same)
    source: str           # the downloaded dataset it came from (e.g. cifar10_jpeg)
    epochs: int
    test: dict
    improves_on: str | None = None
    trained: dict = field(default_factory=dict)  # where and how long: evaluate's copy of train's record
    conventions: dict = field(default_factory=dict)  # the metrics' conventions, as evaluate recorded them
    vs_seed: float | None = None  # PSNR dB or accuracy points over the improves_on experiment
    best: bool = False
    images: dict[str, Path] = field(default_factory=dict)


def build_rows(experiments: dict, metrics: dict[str, dict]) -> list[Row]:
    """One row per experiment, ranked and with the best of each group marked.

    ``experiments`` maps names to validated experiment params, ``metrics`` to
    the evaluate stage's JSON. Autoencoders come first, then classifiers;
    within a task, rows are grouped by input and target data and sorted best
    first.
    """
    rows = []
    for name, exp in experiments.items():
        summary = metrics[name]
        rows.append(Row(name=name, task=exp.task, description=exp.description, seed_figure=exp.seed_figure,
                        dataset=exp.data.target if exp.data.input == exp.data.target
                        else f"{exp.data.input} -> {exp.data.target}", source=summary.get("dataset_source", ""),
                        epochs=int(summary["epochs"]), test=summary["test"], improves_on=exp.improves_on,
                        trained=summary.get("trained", {}), conventions=summary.get("conventions", {})))

    def score(row: Row) -> float:
        return row.test.get("psnr" if row.task == "autoencoder" else "accuracy", float("-inf"))

    by_name = {row.name: row for row in rows}
    for row in rows:
        if row.improves_on in by_name:
            gain = score(row) - score(by_name[row.improves_on])
            row.vs_seed = gain if row.task == "autoencoder" else 100 * gain

    rows.sort(key=lambda r: (r.task != "autoencoder", r.dataset, -score(r), r.name))
    best: dict[tuple[str, str], float] = {}
    size: dict[tuple[str, str], int] = {}
    for row in rows:
        group = (row.task, row.dataset)
        best[group] = max(best.get(group, float("-inf")), score(row))
        size[group] = size.get(group, 0) + 1
    for row in rows:
        group = (row.task, row.dataset)
        row.best = size[group] > 1 and score(row) == best[group]  # a model alone in its group is not "best"
    return rows


def _num(value, digits: int = 2, suffix: str = "") -> str:
    return "" if value is None else f"{value:.{digits}f}{suffix}"


def _gain(row: Row) -> float | None:
    psnr, pca = row.test.get("psnr"), row.test.get("pca_baseline_psnr")
    return None if psnr is None or pca is None else psnr - pca


AE_COLUMNS = ("experiment", "dataset", "epochs", "train s", "latent", "PSNR dB", "PSNR pooled", "PCA same latent",
              "vs PCA", "vs seed", "input (noisy, grey)", "SSIM", "SSIM input", "Keras \"accuracy\"",
              "seed's figure")
CLF_COLUMNS = ("experiment", "dataset", "epochs", "train s", "accuracy", "vs seed", "worst class", "R / G / B digits",
               "loss", "seed's figure")


def _seed_gain(row: Row) -> float | None:
    return row.vs_seed


def _vs_seed(row: Row) -> str:
    if row.vs_seed is None:
        return ""
    return f"{row.vs_seed:+.2f}{' dB' if row.task == 'autoencoder' else ' pt'} ({row.improves_on})"


def _colours(t: dict) -> str:
    keys = [f"colour_accuracy.{c}" for c in ("red", "green", "blue")]
    return " / ".join(_num(100 * t[k], 1, "%") if k in t else "-" for k in keys) if any(k in t for k in keys) else ""


def _train_s(row: Row) -> str:
    """The train stage's seconds; marked when they are only a resumed run's share."""
    seconds = row.trained.get("seconds")
    if seconds is None:
        return ""
    return f"{seconds:.0f}" + (f" (from epoch {row.trained['resumed_at_epoch']})"
                               if row.trained.get("resumed_at_epoch") else "")


TRAINED_ON = ("accelerator", "cpu", "keras_backend", "keras", "jax", "tensorflow", "git_commit")


def trained_on(rows: list[Row]) -> list[str]:
    """One line per distinct machine, backend, versions and commit the rows were trained with."""
    groups: dict[tuple, list[str]] = {}
    for row in rows:
        key = tuple((k, row.trained[k]) for k in TRAINED_ON if k in row.trained)
        groups.setdefault(key, []).append(row.name)
    lines = []
    for key, names in groups.items():
        where = dict(key)
        if not where:
            lines.append(f"no record of the machine (trained before runs recorded it): {', '.join(names)}")
            continue
        versions = ", ".join(f"{k} {where[k]}" for k in ("keras", "jax", "tensorflow") if k in where)
        device = where.get("accelerator") if where.get("accelerator", "none") != "none" else where.get("cpu", "?")
        lines.append(f"{device}, Keras on {where.get('keras_backend', '?')} ({versions}), commit "
                     f"{where.get('git_commit', 'unknown')[:10]}: "
                     + (f"all {len(names)} experiments" if len(groups) == 1 < len(names) else ", ".join(names)))
    return lines


def _ssim(row: Row, key: str) -> str:
    """An SSIM figure, marked "(old)" when its metrics file predates the valid-region convention."""
    value = _num(row.test.get(key), 3)
    old = value and row.conventions.get("ssim") != metrics.SSIM_CONVENTION
    return f"{value} (old)" if old else value


def _ae_cells(row: Row) -> list[str]:
    t = row.test
    gain = _gain(row)
    return [row.name, f"{row.dataset} ({row.source})", str(row.epochs), _train_s(row),
            str(int(t.get("latent_size", 0))),
            _num(t.get("psnr")), _num(t.get("psnr_pooled")), _num(t.get("pca_baseline_psnr")),
            "" if gain is None else f"{gain:+.2f}", _vs_seed(row), _num(t.get("psnr_input")), _ssim(row, "ssim"),
            _ssim(row, "ssim_input"), _num(100 * t["keras_accuracy"] if "keras_accuracy" in t else None, 1, "%"),
            row.seed_figure or ""]


def _clf_cells(row: Row) -> list[str]:
    t = row.test
    return [row.name, f"{row.dataset} ({row.source})", str(row.epochs), _train_s(row),
            _num(100 * t["accuracy"], 2, "%"),
            _vs_seed(row), _num(100 * t["min_class_accuracy"], 1, "%"), _colours(t), _num(t.get("loss"), 4),
            row.seed_figure or ""]


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(rows: list[Row], not_evaluated: tuple[str, ...] = ()) -> str:
    lines = ["# Experiments", "",
             "Test split. PSNR is the mean of per-image PSNR; \"PSNR pooled\" is the PSNR of the MSE "
             "over all test images. \"PCA same latent\" is a PCA reconstruction (of the corrupted input, "
             "for a denoiser) with as many components as the autoencoder's latent values. \"vs seed\": "
             "an improved model's PSNR (dB) or accuracy (points) minus the seed experiment's it improves on. "
             "\"Input\": the corrupted (noisy or grey) input scored as if it were the output. "
             "SSIM: Wang et al. (2004), an 11x11 Gaussian window (sigma 1.5) averaged over the valid region "
             "only, as scikit-image's structural_similarity with gaussian_weights, sigma 1.5, population "
             "covariances and data_range 1; \"(old)\": from a metrics file written before that convention, which "
             "averaged the whole map with the window reflected at the edges (not comparable). "
             "**Bold**: the best of several models for the same data (input and target). \"train s\": "
             "the train stage's seconds, compile and checkpoints included.", ""]
    lines += ["Trained on:", ""] + [f"- {line}" for line in trained_on(rows)] + [""]
    if not_evaluated:
        lines += [f"Not evaluated yet, so left out: {', '.join(not_evaluated)}.", ""]
    for task, columns, cells in (("autoencoder", AE_COLUMNS, _ae_cells), ("classifier", CLF_COLUMNS, _clf_cells)):
        chosen = [r for r in rows if r.task == task]
        if not chosen:
            continue
        lines += [f"## {task.capitalize()}s", "", "| " + " | ".join(columns) + " |",
                  "|" + "---|" * len(columns)]
        for row in chosen:
            values = [_md_escape(c) for c in cells(row)]
            if row.best:
                values[0] = f"**{values[0]}**"
            lines.append("| " + " | ".join(values) + " |")
        lines.append("")
    return "\n".join(lines)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f0f0f0; }
td:first-child, td:nth-child(2), td:last-child, th:first-child, th:nth-child(2), th:last-child { text-align: left; }
tr.best td { background: #e6f4e6; font-weight: 600; }
.up { color: #17702a; } .down { color: #b02020; }
.cards { display: flex; flex-wrap: wrap; gap: 1.5em; }
.card { border: 1px solid #ddd; padding: 0.8em; max-width: 46em; }
.card img { max-width: 100%; display: block; margin-top: 0.5em; }
.card p { margin: 0.2em 0; color: #555; }
"""


def _html_table(rows: list[Row], columns, cells) -> str:
    """The table, with the gains ("vs PCA", "vs seed") green when up and red when down."""
    gains = {i: fn for i, fn in ((columns.index(c), fn) for c, fn in (("vs PCA", _gain), ("vs seed", _seed_gain))
                                 if c in columns)}
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"]
    for row in rows:
        values = [html.escape(c) for c in cells(row)]
        for column, fn in gains.items():
            if (gain := fn(row)) is not None:
                values[column] = f'<span class="{"up" if gain >= 0 else "down"}">{values[column]}</span>'
        values[0] = f'<a href="#{html.escape(row.name)}">{values[0]}</a>'
        out.append(f'<tr class="{"best" if row.best else ""}">' + "".join(f"<td>{v}</td>" for v in values) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def render_html(rows: list[Row], not_evaluated: tuple[str, ...] = ()) -> str:
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>Experiments</title>", f"<style>{STYLE}</style></head><body>", "<h1>Experiments</h1>",
             "<p>Test split. PSNR: mean of per-image PSNR; pooled: PSNR of the MSE over all test images. "
             "PCA same latent: a PCA reconstruction with as many components as the latent has values "
             "(for a denoiser, of the noisy input). vs seed: an improved model's PSNR (dB) or accuracy "
             "(points) minus the seed experiment's it improves on. Input: the corrupted (noisy or grey) input "
             "scored as if it were the output. SSIM: Wang et al. (2004), an 11x11 Gaussian window (sigma 1.5) "
             "averaged over the valid region only, as scikit-image's structural_similarity with gaussian_weights, "
             "sigma 1.5, population covariances and data_range 1; (old): from a metrics file written before that "
             "convention, which averaged the whole map with the window reflected at the edges (not comparable). "
             "Green rows: the best of several models for the same data "
             "(input and target). train s: the train stage's seconds, compile and checkpoints included.</p>",
             "<p>Trained on:</p><ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in trained_on(rows))
             + "</ul>"]
    if not_evaluated:
        parts.append(f"<p>Not evaluated yet, so left out: {html.escape(', '.join(not_evaluated))}.</p>")
    for task, columns, cells in (("autoencoder", AE_COLUMNS, _ae_cells), ("classifier", CLF_COLUMNS, _clf_cells)):
        chosen = [r for r in rows if r.task == task]
        if not chosen:
            continue
        parts += [f"<h2>{task.capitalize()}s</h2>", _html_table(chosen, columns, cells), '<div class="cards">']
        for row in chosen:
            parts.append(f'<div class="card" id="{html.escape(row.name)}"><h3>{html.escape(row.name)}</h3>'
                         f"<p>{html.escape(row.description)}</p>")
            if row.seed_figure:
                parts.append(f"<p>Seed's figure: {html.escape(row.seed_figure)}</p>")
            if row.improves_on:
                parts.append(f'<p>Improves on <a href="#{html.escape(row.improves_on)}">'
                             f"{html.escape(row.improves_on)}</a>: {html.escape(_vs_seed(row))}</p>")
            for label, path in row.images.items():
                parts.append(f'<img alt="{html.escape(row.name)} {html.escape(label)}" src="{_data_uri(path)}">')
            parts.append("</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def log_to_mlflow(pages: dict[str, str], run_ids: dict[str, str], rows: list[Row]) -> str:
    """One MLflow run grouping the experiments' runs, with ``pages`` ({file name: text}); returns its id."""
    import mlflow

    with tracked_run(PIPELINE_EXPERIMENT, "report", name="report", pending=PENDING) as run, failures("report"):
        client = mlflow.tracking.MlflowClient()
        mlflow.set_tags(run_tags("report", **{f"run.{name}": rid for name, rid in run_ids.items()}))
        for row in rows:
            key = "psnr" if row.task == "autoencoder" else "accuracy"
            if key in row.test:
                mlflow.log_metric(f"{row.name}.test_{key}", row.test[key])
        for file_name, text in pages.items():
            mlflow.log_text(text, file_name)
        for name, rid in run_ids.items():
            try:
                client.set_tag(rid, "pipeline_run_id", run.info.run_id)
            except mlflow.exceptions.MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("report: run %s of %s is not in this store, not linked (%s)", rid, name,
                            describe_failure(exc))
    return run.info.run_id


def report(params: params_mod.Params, metrics_dir: Path, reports_dir: Path, models_dir: Path,
           out_dir: Path, log_mlflow: bool = True, evaluated_only: bool = False,
           images_dir: Path = Path("plots/images")) -> list[Row]:
    """Write the pages; every experiment must have its metrics file, unless
    ``evaluated_only``, which reports those that have one and names the others
    on the pages (a partial report while runs go on)."""
    experiments = params.experiments
    if not experiments:
        raise PipelineError("params.yaml: 'experiments' is empty; nothing to report")
    not_evaluated: tuple[str, ...] = ()
    if evaluated_only:
        not_evaluated = tuple(name for name in experiments if not (metrics_dir / f"{name}.json").is_file())
        experiments = {name: exp for name, exp in experiments.items() if name not in not_evaluated}
        if not experiments:
            raise PipelineError(f"{metrics_dir}/: no experiment has been evaluated yet; nothing to report")
        if not_evaluated:
            log.info("report: leaving out %d not evaluated yet: %s", len(not_evaluated), ", ".join(not_evaluated))
    log.info("report: %d experiments from %s/, %s/ and %s/", len(experiments), metrics_dir, models_dir, reports_dir)
    metrics = {name: atomic.read_json(metrics_dir / f"{name}.json", f"evaluate@{name}") for name in experiments}
    rows = build_rows(experiments, metrics)
    for row in rows:
        wanted = AE_IMAGES if row.task == "autoencoder" else CLF_IMAGES
        found = {GRIDS[row.task]: images_dir / f"{row.name}.png",
                 **{Path(f).stem: reports_dir / row.name / f for f in wanted}}
        row.images = {label: path for label, path in found.items() if path.is_file()}
    pages = {"summary.md": render_markdown(rows, not_evaluated), "index.html": render_html(rows, not_evaluated)}
    if log_mlflow:  # first, so that a store that fails leaves no report behind
        run_ids = {name: load_run_ref(models_dir / name / "run.json")["run_id"] for name in experiments}
        run_id = log_to_mlflow(pages, run_ids, rows)
        log.info("report: MLflow run %s in experiment '%s'", run_id, PIPELINE_EXPERIMENT)
    for file_name, text in pages.items():
        atomic.write_text(out_dir / file_name, text)
    return rows


def main(argv=None) -> int:
    def configure(parser):
        parser.add_argument("--metrics", type=Path, default=Path("metrics"), help="metrics folder")
        parser.add_argument("--reports", type=Path, default=Path("reports/experiments"),
                            help="per-experiment images (evaluate's)")
        parser.add_argument("--images", type=Path, default=Path("plots/images"),
                            help="per-experiment image grids (evaluate's DVC image plots)")
        parser.add_argument("--models", type=Path, default=Path("models"), help="train outputs (run ids)")
        parser.add_argument("--out", type=Path, default=Path("reports"), help="where summary.md and index.html go")
        parser.add_argument("--no-mlflow", action="store_true", help="write the files only")
        parser.add_argument("--evaluated-only", action="store_true",
                            help="report the experiments evaluated so far and name the others (a partial "
                                 "report while runs go on; not for dvc.yaml)")

    def body(args):
        report(params_mod.load(args.params), args.metrics, args.reports, args.models, args.out,
               log_mlflow=not args.no_mlflow, evaluated_only=args.evaluated_only, images_dir=args.images)
        return [args.out / "index.html", args.out / "summary.md"]

    return cli.run("report", __doc__, body, configure, argv)


if __name__ == "__main__":
    raise SystemExit(main())
