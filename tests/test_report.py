"""The report stage's tables and pages (its MLflow run is checked in test_pipeline)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from stages import params as params_mod
from stages.errors import PipelineError
from stages.report import build_rows, render_html, render_markdown, report

AE = {"kind": "conv_autoencoder", "filters": [4], "poolings": 1}
CNN = {"kind": "cnn", "conv": [{"filters": 4}]}


def _params(**experiments):
    return params_mod.parse({
        "datasets": {"digits": {"source": {"builtin": "mnist"}}, "shapes": {"source": {"builtin": "mnist"}}},
        "corruptions": {"digits_noisy": {"dataset": "digits", "kind": "gaussian", "factor": 0.5}},
        "experiments": experiments,
    })


def _ae(target="prepared/digits", source=None, seed_figure=None):
    return {"task": "autoencoder", "description": "an AE", "seed_figure": seed_figure,
            "data": {"input": source or target, "target": target}, "model": AE,
            "training": {"loss": "bce", "epochs": 1, "batch_size": 4}}


def _clf(data="prepared/digits"):
    return {"task": "classifier", "data": {"input": data, "target": data}, "model": CNN,
            "training": {"loss": "sparse_categorical_crossentropy", "epochs": 1, "batch_size": 4}}


def _ae_metrics(psnr, pca=20.0, **extra):
    return {"epochs": 3, "dataset_source": "mnist",
            "test": {"psnr": psnr, "psnr_pooled": psnr - 0.5, "pca_baseline_psnr": pca, "ssim": 0.9,
                     "keras_accuracy": 0.8, "latent_size": 392, **extra}}


def _clf_metrics(accuracy):
    return {"epochs": 2, "dataset_source": "mnist",
            "test": {"accuracy": accuracy, "min_class_accuracy": accuracy / 2, "loss": 0.3}}


def test_rows_ranked_within_the_same_input_and_target_and_best_marked():
    params = _params(small=_ae(), big=_ae(), other=_ae(target="prepared/shapes"), cnn_a=_clf(), cnn_b=_clf(),
                     denoise=_ae(source="corrupted/digits_noisy"))
    metrics = {"small": _ae_metrics(21.0), "big": _ae_metrics(24.0), "other": _ae_metrics(18.0),
               "cnn_a": _clf_metrics(0.5), "cnn_b": _clf_metrics(0.9), "denoise": _ae_metrics(19.0)}
    rows = build_rows(params.experiments, metrics)
    assert [r.name for r in rows] == ["denoise", "big", "small", "other", "cnn_b", "cnn_a"]
    # a denoiser is not ranked against autoencoders that see clean input; a model alone is not "best"
    assert {r.name for r in rows if r.best} == {"big", "cnn_b"}
    assert rows[0].dataset == "corrupted/digits_noisy -> prepared/digits"
    assert rows[1].epochs == 3 and rows[1].dataset == "prepared/digits"


def test_markdown_table_shows_gain_over_pca_seed_figure_and_noisy_input():
    params = _params(dae=_ae(source="corrupted/digits_noisy", seed_figure="val_loss 0.1 | 10 epochs"),
                     dae_small=_ae(source="corrupted/digits_noisy"), cnn=_clf(), cnn_small=_clf())
    metrics = {"dae": _ae_metrics(23.5, pca=21.25, psnr_input=9.4), "cnn": _clf_metrics(0.9876),
               "dae_small": _ae_metrics(20.0, psnr_input=9.4), "cnn_small": _clf_metrics(0.5)}
    text = render_markdown(build_rows(params.experiments, metrics))
    ae_line = next(line for line in text.splitlines() if "**dae**" in line)
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", ae_line)[1:-1]]
    assert cells[0] == "**dae**"
    assert cells[5:12] == ["23.50", "23.00", "21.25", "+2.25", "", "9.40", "0.900 (old)"]  # no convention recorded
    assert cells[-1] == "val_loss 0.1 \\| 10 epochs"  # a '|' in a figure does not break the table
    assert "| **cnn** | prepared/digits (mnist) | 2 |  | 98.76% |  | 49.4% |  | 0.3000 |" in text


def _improved(base: dict, seed: str) -> dict:
    return {**base, "improves_on": seed}


def test_improved_experiments_show_their_gain_over_the_seed():
    params = _params(seed_ae=_ae(), plus_ae=_improved(_ae(), "seed_ae"), cnn=_clf(), cnn_plus=_improved(_clf(), "cnn"))
    metrics = {"seed_ae": _ae_metrics(23.0), "plus_ae": _ae_metrics(25.5), "cnn": _clf_metrics(0.71),
               "cnn_plus": _clf_metrics(0.6825)}
    rows = {r.name: r for r in build_rows(params.experiments, metrics)}
    assert rows["plus_ae"].vs_seed == pytest.approx(2.5) and rows["seed_ae"].vs_seed is None
    assert rows["cnn_plus"].vs_seed == pytest.approx(-2.75)
    text = render_markdown(list(rows.values()))
    assert "| +2.50 dB (seed_ae) |" in text and "| -2.75 pt (cnn) |" in text
    page = render_html(list(rows.values()))
    assert '<span class="up">+2.50 dB (seed_ae)</span>' in page
    assert '<span class="down">-2.75 pt (cnn)</span>' in page
    assert 'Improves on <a href="#cnn">cnn</a>' in page


def test_colour_accuracy_column_for_colored_digits():
    params = _params(cnn=_clf())
    summary = _clf_metrics(0.5)
    summary["test"].update({"colour_accuracy.red": 0.99, "colour_accuracy.green": 0.31, "colour_accuracy.blue": 0.2})
    text = render_markdown(build_rows(params.experiments, {"cnn": summary}))
    assert "| 99.0% / 31.0% / 20.0% |" in text


def test_improves_on_must_name_another_experiment_of_the_same_task():
    with pytest.raises(params_mod.ParamsError, match=r"experiments.plus.improves_on: 'seed_a' names no other "
                                                     r"experiment \(did you mean 'seed_ae'\?\)"):
        _params(seed_ae=_ae(), plus=_improved(_ae(), "seed_a"))
    with pytest.raises(params_mod.ParamsError, match=r"'cnn' is a classifier, plus a autoencoder"):
        _params(cnn=_clf(), plus=_improved(_ae(), "cnn"))


def test_html_is_self_contained_escaped_and_embeds_images(tmp_path):
    params = _params(ae_1=_ae())
    rows = build_rows(params.experiments, {"ae_1": _ae_metrics(19.0, pca=20.0)})
    png = tmp_path / "reconstructions.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png)
    rows[0].images = {"reconstructions": png}
    rows[0].description = "<script>alert(1)</script>"
    page = render_html(rows)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert page.count('src="data:image/png;base64,') == 1
    assert not re.search(r'(src|href)="(https?:|/|file:)', page)  # nothing loaded from elsewhere
    assert '<span class="down">-1.00</span>' in page  # below the PCA baseline, shown in red


def test_report_writes_both_files_and_names_a_missing_metrics_file(tmp_path):
    params = _params(ae_1=_ae(), cnn=_clf())
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "ae_1.json").write_text(json.dumps(_ae_metrics(22.0)))
    with pytest.raises(PipelineError, match=r"metrics/cnn\.json: not found; run evaluate@cnn first"):
        report(params, metrics_dir, tmp_path / "reports", tmp_path / "models", tmp_path / "out", log_mlflow=False)
    assert not (tmp_path / "out").exists()

    (metrics_dir / "cnn.json").write_text(json.dumps(_clf_metrics(0.7)))
    folder = tmp_path / "reports" / "cnn"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "confusion_matrix.png")
    rows = report(params, metrics_dir, tmp_path / "reports", tmp_path / "models", tmp_path / "out",
                  log_mlflow=False)
    assert [r.name for r in rows] == ["ae_1", "cnn"]
    assert "ae_1" in (tmp_path / "out" / "summary.md").read_text()
    assert (tmp_path / "out" / "index.html").read_text().count("data:image/png") == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["index.html", "summary.md"]


def test_evaluated_only_reports_what_has_run_and_names_the_rest(tmp_path):
    params = _params(ae_1=_ae(), ae_plus=_improved(_ae(), "ae_1"), cnn=_clf())
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    with pytest.raises(PipelineError, match=r"metrics/: no experiment has been evaluated yet"):
        report(params, metrics_dir, tmp_path / "reports", tmp_path / "models", tmp_path / "out",
               log_mlflow=False, evaluated_only=True)
    (metrics_dir / "ae_plus.json").write_text(json.dumps(_ae_metrics(25.0)))
    (metrics_dir / "cnn.json").write_text(json.dumps(_clf_metrics(0.7)))
    rows = report(params, metrics_dir, tmp_path / "reports", tmp_path / "models", tmp_path / "out",
                  log_mlflow=False, evaluated_only=True)
    assert [r.name for r in rows] == ["ae_plus", "cnn"]
    assert rows[0].vs_seed is None  # its seed has not run: no gain to show
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "Not evaluated yet, so left out: ae_1." in summary
    assert "| ae_plus |" in summary and "| ae_1 |" not in summary
    assert "Not evaluated yet, so left out: ae_1.</p>" in (tmp_path / "out" / "index.html").read_text()

    (metrics_dir / "ae_1.json").write_text(json.dumps(_ae_metrics(22.0)))
    rows = report(params, metrics_dir, tmp_path / "reports", tmp_path / "models", tmp_path / "out",
                  log_mlflow=False, evaluated_only=True)
    assert {r.name: r.vs_seed for r in rows}["ae_plus"] == pytest.approx(3.0)
    assert "Not evaluated yet" not in (tmp_path / "out" / "summary.md").read_text()


def test_the_evaluated_only_flag_writes_the_pages(tmp_path, monkeypatch):
    from stages.report import main

    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump({
        "datasets": {"digits": {"source": {"builtin": "mnist"}}},
        "experiments": {"ae_1": _ae(), "cnn": _clf()}}))
    Path("metrics").mkdir()
    Path("metrics/cnn.json").write_text(json.dumps(_clf_metrics(0.7)))
    assert main(["--no-mlflow"]) != 0  # the stage itself wants every experiment
    assert not Path("reports").exists()
    assert main(["--no-mlflow", "--evaluated-only"]) == 0
    assert "left out: ae_1." in Path("reports/summary.md").read_text()
    assert Path("reports/index.html").is_file()


def test_rows_say_where_and_how_long_they_trained():
    params = _params(a=_ae(), b=_clf(), c=_clf())
    gpu = {"accelerator": "NVIDIA H200", "cpu": "AMD EPYC", "keras_backend": "jax", "keras": "3.15.1",
           "jax": "0.11.2", "git_commit": "0123456789abcdef"}
    metrics = {"a": {**_ae_metrics(23.5), "trained": {**gpu, "seconds": 41.6, "resumed_at_epoch": 0}},
               "b": {**_clf_metrics(0.9), "trained": {**gpu, "seconds": 12.2, "resumed_at_epoch": 3}},
               "c": _clf_metrics(0.8)}
    rows = build_rows(params.experiments, metrics)
    text = render_markdown(rows)
    assert "- NVIDIA H200, Keras on jax (keras 3.15.1, jax 0.11.2), commit 0123456789: a, b" in text
    assert "- no record of the machine (trained before runs recorded it): c" in text
    cells = {row.name: row for row in rows}
    from stages.report import _train_s
    assert _train_s(cells["a"]) == "42" and _train_s(cells["b"]) == "12 (from epoch 3)" and _train_s(cells["c"]) == ""
    one = build_rows(_params(a=_ae()).experiments, {"a": metrics["a"]})
    assert "commit 0123456789: a\n" in render_markdown(one)
    two = build_rows(_params(a=_ae(), b=_clf()).experiments, {"a": metrics["a"], "b": metrics["b"]})
    assert "commit 0123456789: all 2 experiments" in render_markdown(two)
    assert "<li>NVIDIA H200, Keras on jax" in render_html(one)


def test_ssim_from_before_the_valid_region_convention_is_marked_old():
    from stages import metrics as metrics_mod

    params = _params(new=_ae(), old=_ae())
    found = {"new": {**_ae_metrics(23.0), "conventions": {"ssim": metrics_mod.SSIM_CONVENTION}},
             "old": _ae_metrics(22.0)}
    text = render_markdown(build_rows(params.experiments, found))
    line = {name: next(l for l in text.splitlines() if f"| {name} |" in l or f"**{name}**" in l) for name in found}
    assert "0.900 (old)" in line["old"] and "(old)" not in line["new"] and "0.900" in line["new"]
