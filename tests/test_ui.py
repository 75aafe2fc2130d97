"""What users look at, in a real headless Chromium: the MLflow UI served by a
real ``mlflow server`` over a store that ``dvc repro`` filled, and the
pipeline's HTML report (checks in ``tests/ui_check.py``)."""

from __future__ import annotations

import os

import pytest

import builders
import ui_check
from dvc_helpers import dvc_env, make_project, pets_params, run_dvc
from mlflow_server import MlflowServer
from test_pipeline import PETS_DAE

pytestmark = pytest.mark.heavy  # real pipelines, servers or clusters: scheduled first (conftest.py)

if ui_check.chromium_path() is None and not os.environ.get("CI"):
    pytest.skip("no Chromium here (make test installs Debian's chromium; CHROMIUM names another)",
                allow_module_level=True)

PETS_AE = {**PETS_DAE, "data": {"input": "prepared/pets", "target": "prepared/pets"},
           "training": {**PETS_DAE["training"], "epochs": 2}}  # an image at two steps
PETS_AE2 = {**PETS_AE, "model": {**PETS_AE["model"], "filters": [8]}}


def _filled_project(tmp_path, server: MlflowServer):
    """A toy project whose ``dvc repro`` logs two autoencoders and the report
    run into ``server`` (the smoke checks the classifiers' runs on real data)."""
    folder = tmp_path / "pets"
    builders.image_folder(folder, classes=("cat", "dog"), per_class=4, mode="L")
    archive = builders.tar_gz(folder, tmp_path / "pets.tar.gz")
    source = {"path": str(archive), "sha256": builders.sha256(archive.read_bytes())}
    experiments = {"pets_ae": PETS_AE, "pets_ae2": PETS_AE2}
    project = make_project(tmp_path / "proj", pets_params(source, experiments))
    run_dvc(project, "repro", env=dvc_env(server.url))
    return project


def test_mlflow_ui_and_report_show_what_the_pipeline_logged(tmp_path, monkeypatch):
    """One store filled by ``dvc repro`` (built once: the repro is most of the
    time). The MLflow UI: experiments list, runs list, a run's metrics (values
    as the store has them), its curves, its reconstruction grid as served, the
    compare view, both logged models with their metrics, both registered
    models with their @champion, and the reconstructions' steps; the report
    page: table and images. Then the check fails where the page does not show
    what it expects."""
    server = MlflowServer(tmp_path / "server").start()
    try:
        project = _filled_project(tmp_path, server)
        shots = tmp_path / "shots"
        with ui_check.browser(shots, server.url) as visit:
            problems = ui_check.check_mlflow_ui(
                visit, server, {"autoencoders": ["pets_ae", "pets_ae2"], "pipeline": ["report"]},
                focus=("autoencoders", "pets_ae"))
            problems += ui_check.check_logged_models(visit, server, "autoencoders", ["pets_ae", "pets_ae2"])
            problems += ui_check.check_registered_models(visit, server, ["pets_ae", "pets_ae2"])
            problems += ui_check.check_image_steps(visit, server, "autoencoders", "pets_ae", "reconstructions")
            problems += ui_check.check_report(visit, project / "reports/index.html", ["pets_ae", "pets_ae2"])
            assert problems == []

            monkeypatch.setattr(ui_check, "WAIT_MS", 5_000)
            visit.open(server.url + "/#/experiments")
            assert not visit.wait_for_text("autoencoders", "no_such_experiment", what="experiments list")
            assert visit.problems[-1].startswith("experiments list: 'no_such_experiment' not on the page")
    finally:
        server.stop()
    names = sorted(p.name for p in shots.iterdir())
    assert names == ["mlflow-artifact.png", "mlflow-charts.png", "mlflow-compare.png", "mlflow-experiments.png",
                     "mlflow-images.png", "mlflow-models.png", "mlflow-registry.png", "mlflow-run.png",
                     "mlflow-runs.png", "report.png"]
    assert all(ui_check.png_size((shots / n).read_bytes()) == (1400, 900) for n in names)


def test_report_check_fails_on_a_broken_image(tmp_path):
    page = tmp_path / "index.html"
    page.write_text("<table><tr><td>pets_dae</td></tr></table><img src='missing.png'>")
    with ui_check.browser(None) as visit:
        problems = ui_check.check_report(visit, page, ["pets_dae", "pets_cnn"])
    assert any("no table row for pets_cnn" in p for p in problems)
    assert any("1 of 1 images did not load" in p for p in problems)


@pytest.mark.skipif(not __import__("shutil").which("node"), reason="node (JavaScript's own formatting) is not here")
def test_metric_values_are_looked_for_as_javascript_prints_them():
    """The UI prints a metric with JavaScript's String(number): fixed notation
    down to 1e-6 (a test MSE of 5.2e-05 is shown as 0.000052), exponents
    without a leading zero. Checked against Node.js itself."""
    import json
    import subprocess

    values = [5.199999941396527e-05, 0.0762, 1e-6, 9.99e-7, 1e-7, 5.2e-7, 3.0, 23.583, 1.5e22, 1e21,
              -4.2e-05, 0.1, 0.9439123456789, 123456.789, -0.0]
    script = "for (const v of JSON.parse(process.argv[1])) console.log(String(v))"
    printed = subprocess.run(["node", "-e", script, json.dumps(values)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert [ui_check.shown_value(v) for v in values] == printed
