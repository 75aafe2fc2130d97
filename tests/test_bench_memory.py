"""benchmarks/bench_memory.py on a tiny image-folder dataset: the stages the
chosen experiments need run in pipeline order, each in its own process, and
each row's peak memory is that process's own."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import bench_module
import builders
from dvc_helpers import dvc_env, pets_params
from test_pipeline import PETS_DAE

pytestmark = pytest.mark.heavy  # real pipelines, servers or clusters: scheduled first (conftest.py)

REPO = Path(__file__).resolve().parents[1]


def _params(tmp_path) -> Path:
    folder = tmp_path / "pets"
    builders.image_folder(folder, classes=("cat", "dog"), per_class=4, mode="L")
    archive = builders.tar_gz(folder, tmp_path / "pets.tar.gz")
    source = {"path": str(archive), "sha256": builders.sha256(archive.read_bytes())}
    corruptions = {"pets_noisy": {"dataset": "pets", "kind": "gaussian", "factor": 0.3, "seed": 0},
                   "pets_rgb": {"dataset": "pets", "kind": "colorize", "mode": "channel", "seed": 0}}
    experiments = {"pets_dae": PETS_DAE, "pets_dae_plus": {**PETS_DAE, "improves_on": "pets_dae"}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(pets_params(source, experiments, corruptions), sort_keys=False))
    return path


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.bench_memory", *args], cwd=REPO, env=dvc_env(),
                          capture_output=True, text=True, timeout=600)


def test_every_stage_of_the_dataset_in_its_own_process(tmp_path):
    out = tmp_path / "results.json"
    done = _bench("--params", str(_params(tmp_path)), "--dataset", "pets", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    stages = [row["stage"] for row in result["stages"]]
    # the unused corruption and the improved experiment are left out by default
    assert stages == ["download@pets", "prepare@pets", "corrupt@pets_noisy", "train@pets_dae",
                      "evaluate@pets_dae", "report"]
    assert result["images"] == {"train": 6, "val": 2, "test": 8} and result["epochs"] == 1
    peak = {row["stage"]: row["peak_rss_mib"] for row in result["stages"]}
    assert all(row["wall_s"] > 0 for row in result["stages"])
    # the rows are the stages' own processes: training loads Keras, download does not
    assert peak["train@pets_dae"] > 2 * peak["download@pets"] > 0
    assert "| `train@pets_dae` |" in done.stdout and result["machine"]["cores"] >= 1
    # the sample with the most resident memory, split by kind: it is one of the
    # process's own readings, so its parts add up to no more than the peak; the
    # kernel counts RSS in per-thread or per-CPU batches, so a
    # /proc reading can pass wait4's peak by a little (897 against 896 MiB seen)
    at_peak = {row["stage"]: row["sampled_at_peak_mib"] for row in result["stages"]}
    train = at_peak["train@pets_dae"]
    assert train["anon"] > 0 and train["file"] > 0
    assert train["anon"] + train["file"] + train["shmem"] <= train["rss"] <= peak["train@pets_dae"] + 4


def test_an_experiment_not_on_the_dataset_is_named_and_nothing_is_written(tmp_path):
    out = tmp_path / "results.json"
    params = _params(tmp_path)
    done = _bench("--params", str(params), "--dataset", "pets", "--experiments", "pets_dae", "mnist_cae",
                  "--out", str(out))
    assert done.returncode != 0
    assert "mnist_cae" in done.stderr and "pets_dae_plus" in done.stderr  # the ones to choose from
    assert not out.exists()
    done = _bench("--params", str(params), "--dataset", "cifar10", "--out", str(out))
    assert done.returncode != 0 and "'cifar10'" in done.stderr and "pets" in done.stderr
    assert not out.exists()


def test_untrained_models_measure_evaluate_without_training(tmp_path):
    out = tmp_path / "results.json"
    done = _bench("--params", str(_params(tmp_path)), "--dataset", "pets", "--experiments", "pets_dae_plus",
                  "--untrained", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [row["stage"] for row in result["stages"]] == ["download@pets", "prepare@pets", "corrupt@pets_noisy",
                                                          "evaluate@pets_dae_plus", "report"]
    assert result["untrained"] is True and result["epochs"] == 0
    peak = {row["stage"]: row["peak_rss_mib"] for row in result["stages"]}
    assert peak["evaluate@pets_dae_plus"] > 2 * peak["download@pets"] > 0
    assert "untrained models" in done.stdout


def test_the_sampler_sees_memory_a_process_holds_and_what_kind_it_is(tmp_path):
    """A child that touches 200 MiB of private memory and holds it: the
    sample at its most shows at least that much anonymous memory, and the
    interpreter's own mapped files as file-backed."""
    bench_memory = bench_module.load("bench_memory")
    child = ("import sys, time; block = bytearray(200 * 2**20); sys.stdout.write('ready'); sys.stdout.flush(); "
             "time.sleep(0.5)")
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE)
    sampler = bench_memory.ResidentSampler(interval=0.01)
    with sampler.watching(process.pid):
        assert process.stdout.read(5) == b"ready"
        process.wait(timeout=60)
    at_peak = sampler.at_peak
    assert at_peak["anon"] >= 200 and at_peak["file"] > 0
    assert at_peak["rss"] >= at_peak["anon"] + at_peak["file"]
    assert bench_memory.resident(process.pid) is None  # reaped: nothing to read
