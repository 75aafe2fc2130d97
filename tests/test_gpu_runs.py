"""offline_gpu/runs.py stays in step with dvc.yaml and params.yaml.

It runs the stages outside DVC and its outputs are then recorded with
``dvc commit``, so it must write exactly what the stages declare and prepare
exactly the data an experiment reads.
"""

import sys
from pathlib import Path

import pytest
import yaml

from benchmarks import harness
from offline_gpu import runs as gpu_runs

ROOT = Path(__file__).resolve().parents[1]

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _declared(stage: str, key: str, field: str) -> list[str]:
    paths = []
    for entry in PIPELINE[stage]["do"].get(field, []):
        path = next(iter(entry)) if isinstance(entry, dict) else entry
        paths.append(path.replace("${key}", key).replace("${item.task}", PARAMS["experiments"][key]["task"]))
    return paths


@pytest.mark.parametrize("name", sorted(PARAMS["experiments"]))
def test_packs_every_output_that_train_and_evaluate_declare_but_the_model(name):
    packed = gpu_runs.small_outputs(name, PARAMS["experiments"][name])
    declared = [path for stage in ("train", "evaluate") for field in ("outs", "metrics", "plots")
                for path in _declared(stage, name, field)]
    assert not any("${" in path for path in declared + packed)
    assert declared
    # the model and its checkpoints stay on the GPU machine, where dvc commit records them
    left = {f"models/{name}/model.keras", f"checkpoints/{name}"}
    for path in declared:
        assert (path in left) != any(path == p or path.startswith(p + "/") for p in packed), path
    for p in packed:  # and nothing that no stage declares
        assert any(path == p or path.startswith(p + "/") for path in declared), p


def test_a_stage_past_the_deadline_is_stopped(tmp_path):
    deadline = gpu_runs.Deadline(0.5)
    assert 0 < deadline.left() <= 0.5 and gpu_runs.NO_DEADLINE.left() is None
    with pytest.raises(SystemExit, match="sleep stopped at the deadline"):
        # any command: a deadline already passed stops it before it ends
        gpu_runs.run([sys.executable, "-c", "import time; time.sleep(60)"], "sleep", tmp_path / "sleep.log",
                     {"PATH": "/usr/bin:/bin"}, deadline=gpu_runs.Deadline(0.0))


def test_the_commands_are_dvc_yamls_and_a_copy_writes_under_its_prefix(tmp_path, monkeypatch):
    """The stages run with exactly dvc.yaml's commands (so dvc commit records
    them); a determinism copy's train and evaluate write only under its folder."""
    item = PARAMS["experiments"]["mnist_cae"]
    seen = []
    monkeypatch.setattr(gpu_runs, "run", lambda cmd, label, log_file, env, deadline=None: seen.append((cmd, label)))
    gpu_runs.run_stage("evaluate", "mnist_cae", item, params=Path("p.yaml"), logs=tmp_path, env={})
    for stage in ("train", "evaluate"):
        gpu_runs.run_stage(stage, "mnist_cae", item, params=Path("p.yaml"), logs=tmp_path, env={},
                           prefix=tmp_path / "det0")
    [(plain, label), (train, _), (evaluate, det_label)] = seen
    words = PIPELINE["evaluate"]["do"]["cmd"].replace("${key}", "mnist_cae").split()[1:]
    assert plain == [sys.executable, *words, "--params", "p.yaml"] and label == "evaluate@mnist_cae"
    assert det_label == "evaluate@mnist_cae.det0"
    for cmd in (train, evaluate):
        paths = [word for word in cmd if "/" in word and not word.startswith(sys.executable) and word != "p.yaml"]
        assert paths and all(word.startswith(str(tmp_path / "det0") + "/") for word in paths), cmd


def test_prepares_the_datasets_and_corruptions_an_experiment_reads():
    assert harness.data_needs(PARAMS, ["mnist_denoise"]) == (["mnist"], ["mnist_gaussian"])
    assert harness.data_needs(PARAMS, ["cifar10_cae_4pool", "mnist_cae"]) == (["cifar10", "mnist"], [])
    assert harness.data_needs(PARAMS, ["colored_mnist_cnn", "fashion_mnist_cnn"]) == (
        ["fashion_mnist", "mnist"], ["colored_mnist"])


def test_overrides_set_existing_params_and_refuse_unknown_keys():
    params = {"limits": {"max_epochs": None, "max_samples": None}, "experiments": {"a": {"training": {"epochs": 5}}}}
    harness.apply_overrides(params, ["limits.max_epochs=1", "experiments.a.training.epochs=2"])
    assert params["limits"]["max_epochs"] == 1 and params["experiments"]["a"]["training"]["epochs"] == 2
    with pytest.raises(ValueError, match="limits.max_epoch=1: expected KEY=VALUE"):
        harness.apply_overrides(params, ["limits.max_epoch=1"])
    with pytest.raises(ValueError, match="no section 'limitz'"):
        harness.apply_overrides(params, ["limitz.max_epochs=1"])
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        harness.apply_overrides(params, ["limits.max_epochs"])


def test_the_seed_experiments_come_from_params_yaml():
    """The seed questions' experiments: a seed figure quoted and an improved
    model beside them (not the deliberately broken model, nor the pipeline's own)."""
    assert harness.seed_experiments(PARAMS) == ["cifar10_cae_4pool", "cifar10_cae_3pool", "mnist_denoise",
                                                "cifar10_cnn", "colored_mnist_cnn", "mnist_cae"]


def test_on_the_mirror_cifar10_is_the_jpeg_copy_and_nothing_else_changes():
    assert PARAMS["datasets"]["cifar10"]["source"] == {"builtin": "cifar10"}  # params.yaml: the official archive
    mirrored = harness.on_mirror(PARAMS)
    assert mirrored["datasets"]["cifar10"]["source"] == {"builtin": "cifar10_jpeg"}
    assert {**mirrored, "datasets": PARAMS["datasets"]} == PARAMS and PARAMS["datasets"]["cifar10"]["source"] == {
        "builtin": "cifar10"}  # a copy
    folder = {"datasets": {"cifar10": {"source": {"path": "cifar.zip"}}}}
    assert harness.mirror_settings(folder) == [] and harness.on_mirror(folder) == folder


def test_a_model_trained_here_at_this_commit_is_only_evaluated(tmp_path, monkeypatch):
    import json

    models, checkpoints = tmp_path / "models", tmp_path / "checkpoints"
    models.mkdir(), checkpoints.mkdir()
    model = models / "model.keras"
    model.write_bytes(b"zip")
    (checkpoints / "state.json").write_text(json.dumps({"complete": True}))
    (models / "run.json").write_text(json.dumps({"run_id": "r", "trained": {"git_commit": "abc"}}))
    monkeypatch.setenv("IMAGEPIPE_SOURCE_COMMIT", "abc")
    assert gpu_runs.trained_here(model, checkpoints)
    monkeypatch.setenv("IMAGEPIPE_SOURCE_COMMIT", "def")  # another commit: train again
    assert not gpu_runs.trained_here(model, checkpoints)
    monkeypatch.delenv("IMAGEPIPE_SOURCE_COMMIT")  # no commit named: never trust what is there
    assert not gpu_runs.trained_here(model, checkpoints)
    monkeypatch.setenv("IMAGEPIPE_SOURCE_COMMIT", "abc")
    (checkpoints / "state.json").write_text(json.dumps({"complete": False, "epoch": 3}))  # killed mid-training
    assert not gpu_runs.trained_here(model, checkpoints)
