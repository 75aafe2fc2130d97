"""The whole pipeline through real DVC commands on a tiny image-folder dataset:
download, prepare, corrupt, then train and evaluate two tiny experiments."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import builders
from dvc_helpers import REPO, git_commit, make_project, pets_params, ran as _ran, run_dvc as _run, wait_for_queue
from stages.images import load

pytestmark = pytest.mark.heavy  # real pipelines, servers or clusters: scheduled first (conftest.py)

PETS_DAE = {"task": "autoencoder", "data": {"input": "corrupted/pets_noisy", "target": "prepared/pets"},
            "model": {"kind": "conv_autoencoder", "filters": [4], "poolings": 1},
            "training": {"loss": "bce", "epochs": 1, "batch_size": 4}}
PETS_CNN = {"task": "classifier", "data": {"input": "prepared/pets", "target": "prepared/pets"},
            "model": {"kind": "cnn", "conv": [{"filters": 4}], "dense": [8]},
            "training": {"loss": "sparse_categorical_crossentropy", "epochs": 1, "batch_size": 4,
                         "metrics": ["accuracy"]}}


@pytest.fixture
def pets_archive(tmp_path) -> Path:
    folder = tmp_path / "pets"
    builders.image_folder(folder, classes=("cat", "dog"), per_class=4, mode="L")
    return builders.tar_gz(folder, tmp_path / "pets.tar.gz")


@pytest.fixture
def dvc_project(tmp_path, pets_archive):
    source = {"path": str(pets_archive), "sha256": builders.sha256(pets_archive.read_bytes())}
    corruptions = {"pets_noisy": {"dataset": "pets", "kind": "gaussian", "factor": 0.3, "seed": 0},
                   "pets_rgb": {"dataset": "pets", "kind": "colorize", "mode": "channel", "seed": 0}}
    params = pets_params(source, {"pets_dae": PETS_DAE, "pets_cnn": PETS_CNN}, corruptions)
    return make_project(tmp_path / "proj", params), params


def test_repro_noop_forced_retrain_then_only_changed_stages(dvc_project):
    """One project through the life of a pipeline (one test: each first repro costs a minute)."""
    dvc_project, params = dvc_project
    git_commit(dvc_project, "the project")  # the runs record this commit
    first = _run(dvc_project, "repro")
    assert _ran(first.stdout) == {"download@pets", "prepare@pets", "corrupt@pets_noisy", "corrupt@pets_rgb",
                                  "train@pets_dae", "evaluate@pets_dae", "train@pets_cnn", "evaluate@pets_cnn",
                                  "report"}
    data = load(dvc_project / "data/prepared/pets.npz")
    assert data.meta["counts"] == {"train": 6, "val": 2, "test": 8}
    assert load(dvc_project / "data/corrupted/pets_rgb.npz").image_shape == (6, 8, 3)

    again = _run(dvc_project, "repro")
    assert _ran(again.stdout) == set()
    assert "Data and pipelines are up to date" in again.stdout

    for name in ("pets_dae", "pets_cnn"):
        metrics = json.loads((dvc_project / f"metrics/{name}.json").read_text())
        assert metrics["experiment"] == name and metrics["epochs"] == 1
        run = json.loads((dvc_project / f"models/{name}/run.json").read_text())
        assert (dvc_project / f"reports/experiments/{name}").is_dir()
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert run["run_id"] and (dvc_project / "mlflow.db").is_file()
    summary = (dvc_project / "reports/summary.md").read_text()
    assert "pets_dae" in summary and "pets_cnn" in summary
    assert "data:image/png;base64," in (dvc_project / "reports/index.html").read_text()
    _dvc_plots_draw_loss_accuracy_and_confusion(dvc_project)

    _forced_retrain_gives_the_same_metrics_and_runs_are_grouped(dvc_project)

    params["corruptions"]["pets_noisy"]["factor"] = 0.6
    (dvc_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _run(dvc_project, "repro")
    assert _ran(changed.stdout) == {"corrupt@pets_noisy", "train@pets_dae", "evaluate@pets_dae", "report"}

    params["experiments"]["pets_cnn"]["training"]["batch_size"] = 2
    (dvc_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    one = _run(dvc_project, "repro")
    assert _ran(one.stdout) == {"train@pets_cnn", "evaluate@pets_cnn", "report"}

    status = _run(dvc_project, "status")
    assert "up to date" in status.stdout


def _dvc_plots_draw_loss_accuracy_and_confusion(dvc_project):
    """``dvc plots show`` with the templates dvc.yaml declares, from evaluate's
    files: the autoencoder's loss curves and test PSNR by percentile, the
    classifier's accuracy curves and confusion matrix, whose cells count the
    test images (8), and each one's image grid."""
    shown = json.loads(_run(dvc_project, "plots", "show", "--json").stdout)
    assert not shown.get("errors"), shown["errors"]
    images = {path: entries for path, entries in shown["data"].items() if entries[0]["type"] == "image"}
    assert set(images) == {"plots/images/pets_dae.png", "plots/images/pets_cnn.png"}, images  # no duplicates
    assert all(Path(entries[0]["url"]).read_bytes()[:4] == b"\x89PNG" for entries in images.values()), images
    plots = {path: entries[0]["content"] for path, entries in shown["data"].items() if path not in images}
    assert set(plots) == {"plots/autoencoder/pets_dae.json", "plots/autoencoder_test/pets_dae.csv",
                          "plots/classifier/pets_cnn.json", "plots/classifier_test/pets_cnn.csv"}
    values = plots["plots/autoencoder/pets_dae.json"]["data"]["values"]
    assert {v["field"] for v in values} == {"loss", "val_loss"} and {v["epoch"] for v in values} == {1}
    percentiles = plots["plots/autoencoder_test/pets_dae.csv"]["data"]["values"]
    assert len(percentiles) == 101 and float(percentiles[0]["psnr_db"]) <= float(percentiles[-1]["psnr_db"])
    accuracy = plots["plots/classifier/pets_cnn.json"]["data"]["values"]
    assert {v["field"] for v in accuracy} == {"accuracy", "val_accuracy"}
    confusion = plots["plots/classifier_test/pets_cnn.csv"]
    assert confusion["title"]["text"] == "Confusion matrix (test split)"
    cells = confusion["data"]["values"]
    assert len(cells) == 8 and {c["actual"] for c in cells} <= {"cat", "dog"}
    matrix = json.loads((dvc_project / "reports/experiments/pets_cnn/confusion.json").read_text())["confusion_matrix"]
    assert sum(c["actual"] == c["predicted"] for c in cells) == matrix[0][0] + matrix[1][1]
    _run(dvc_project, "plots", "show", "-o", "dvc_plots")
    assert (dvc_project / "dvc_plots/index.html").read_text().count("vega") > 4


def _forced_retrain_gives_the_same_metrics_and_runs_are_grouped(dvc_project):
    """Train again from scratch (forced) and compare: op determinism on, same backend."""
    from mlflow.tracking import MlflowClient

    before = {n: (dvc_project / f"metrics/{n}.json").read_text() for n in ("pets_dae", "pets_cnn")}
    first_runs = {n: json.loads((dvc_project / f"models/{n}/run.json").read_text())["run_id"] for n in before}
    _run(dvc_project, "repro", "--force", "--single-item", "train@pets_dae", "train@pets_cnn")
    again = _run(dvc_project, "repro")
    assert {"evaluate@pets_dae", "evaluate@pets_cnn"} <= _ran(again.stdout)
    def results(text: str) -> dict:  # all but the train stage's own seconds, which no two runs share
        metrics = json.loads(text)
        trained = metrics.pop("trained")
        assert trained["seconds"] > 0 and trained["fit_seconds"] > 0
        return {**metrics, "trained": {k: v for k, v in trained.items() if k not in ("seconds", "fit_seconds")}}

    for name, text in before.items():
        assert results((dvc_project / f"metrics/{name}.json").read_text()) == results(text), name
    runs = {n: json.loads((dvc_project / f"models/{n}/run.json").read_text())["run_id"] for n in before}
    assert all(runs[n] != first_runs[n] for n in runs)  # a new run each time, none overwritten

    client = MlflowClient(f"sqlite:///{dvc_project / 'mlflow.db'}")
    pipeline = client.get_experiment_by_name("pipeline")
    reports = client.search_runs([pipeline.experiment_id], order_by=["attributes.start_time DESC"])
    assert len(reports) == 2 and all(r.info.status == "FINISHED" for r in reports)
    latest = reports[0]
    assert {k: v for k, v in latest.data.tags.items() if k.startswith("run.")} == {
        f"run.{n}": rid for n, rid in runs.items()}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=dvc_project, capture_output=True, text=True).stdout.strip()
    for rid in runs.values():  # recorded by MLflow itself (GitPython), beside our dirty flag
        tags = client.get_run(rid).data.tags
        assert tags["mlflow.source.git.commit"] == head and tags["git_dirty"] in ("True", "False")
    assert {a.path for a in client.list_artifacts(latest.info.run_id)} == {"index.html", "summary.md"}
    for name, rid in runs.items():
        child = client.get_run(rid)
        assert child.info.status == "FINISHED" and child.info.run_name == name
        assert child.data.tags["pipeline_run_id"] == latest.info.run_id
        assert child.data.tags["stage"].startswith("train@")
        assert any(k.startswith("data_md5.data/") for k in child.data.tags)


def test_bad_archive_fails_repro_and_leaves_no_output(dvc_project, tmp_path):
    dvc_project, params = dvc_project
    archive = Path(params["datasets"]["pets"]["source"]["path"])
    archive.write_bytes(archive.read_bytes()[:200])  # truncated: checksum no longer matches
    result = _run(dvc_project, "repro", "download@pets", check=False)
    assert result.returncode != 0
    assert "checksum mismatch" in result.stderr + result.stdout
    assert not (dvc_project / "data/raw/pets").exists()
    assert not [p for p in (dvc_project / "data").rglob("*") if "partial" in p.name or ".tmp" in p.name]


def test_bad_params_fail_before_work(dvc_project):
    dvc_project, params = dvc_project
    params["corruptions"]["pets_noisy"]["factr"] = 0.6
    (dvc_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = _run(dvc_project, "repro", "download@pets", check=False)
    assert result.returncode != 0
    assert "unknown key 'corruptions.pets_noisy.factr' (did you mean 'factor'?)" in result.stderr
    assert not (dvc_project / "data/raw/pets").exists()


def test_queued_experiments_run_two_at_a_time_and_keep_their_mlflow_runs(tmp_path, pets_archive):
    """dvc exp run --queue + dvc queue start -j 2: both finish, and their MLflow runs land in the
    project's own store although DVC runs them in temporary copies under .dvc/tmp/exps."""
    from mlflow.tracking import MlflowClient

    source = {"path": str(pets_archive), "sha256": builders.sha256(pets_archive.read_bytes())}
    dvc_project = make_project(tmp_path / "proj", pets_params(source, {"pets_cnn": PETS_CNN}))
    _run(dvc_project, "repro")
    git_commit(dvc_project, "baseline")
    for seed in (1, 2):
        _run(dvc_project, "exp", "run", "--queue", "-n", f"seed{seed}",
             "-S", f"+experiments.pets_cnn.training.seed={seed}")  # + adds a key params.yaml leaves at its default
    _run(dvc_project, "queue", "start", "-j", "2")
    try:
        status = wait_for_queue(dvc_project)
    finally:
        _run(dvc_project, "queue", "stop", check=False)
    assert status.count("Success") == 2, status

    shown = json.loads(_run(dvc_project, "exp", "show", "--json").stdout)
    names = {exp.get("name") for commit in shown for exp in commit.get("experiments") or []}
    assert {"seed1", "seed2"} <= names, names
    diff = json.loads(_run(dvc_project, "plots", "diff", "seed1", "seed2", "--json").stdout)
    # this project has no autoencoder: DVC names the autoencoders' plot folders as missing, and only those
    assert {e["source"] for e in diff.get("errors", [])} <= {"plots/autoencoder", "plots/autoencoder_test"}, diff
    confusion = diff["data"]["plots/classifier_test/pets_cnn.csv"][0]
    assert sorted(confusion["revisions"]) == ["seed1", "seed2"]
    assert {v["rev"] for v in confusion["content"]["data"]["values"]} == {"seed1", "seed2"}

    client = MlflowClient(f"sqlite:///{dvc_project / 'mlflow.db'}")
    classifiers = client.get_experiment_by_name("classifiers")
    runs = client.search_runs([classifiers.experiment_id], "attributes.run_name = 'pets_cnn'")
    by_exp = {r.data.tags.get("dvc_exp_name"): r for r in runs}
    assert {"seed1", "seed2"} <= set(by_exp), sorted(by_exp)
    for name in ("seed1", "seed2"):
        run = by_exp[name]
        assert run.info.status == "FINISHED"
        assert run.data.params["training.seed"] == name[-1]
        assert "test_accuracy" in run.data.metrics  # evaluate logged into the same run
    assert not list((dvc_project / ".dvc" / "tmp").rglob("mlflow.db"))  # nothing left in a copy


@pytest.mark.parametrize("stage", ["download", "prepare", "corrupt", "report"])
def test_a_stage_without_a_model_starts_without_the_heavy_libraries(stage):
    """The data stages and the report need no model: importing one (what
    ``python -m stages.<stage>`` does before its ``main``) must not pull in
    TensorFlow, Keras, JAX or MLflow, whose imports take seconds and about
    half a GiB of memory (docs/benchmarks.md, the peak memory tables)."""
    heavy = ("tensorflow", "keras", "jax", "mlflow", "torch")
    code = (f"import sys, stages.{stage}\n"
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"stages.{stage} imports {result.stdout.strip()}"
