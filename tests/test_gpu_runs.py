"""benchmarks/gpu_runs.py stays in step with dvc.yaml and params.yaml.

It runs the stages outside DVC and its outputs are then recorded with
``dvc commit``, so it must write exactly what the stages declare and prepare
exactly the data an experiment reads.
"""

import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("gpu_runs", ROOT / "benchmarks" / "gpu_runs.py")
gpu_runs = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gpu_runs)

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _declared(stage: str, key: str, field: str) -> list[str]:
    paths = []
    for entry in PIPELINE[stage]["do"].get(field, []):
        path = next(iter(entry)) if isinstance(entry, dict) else entry
        paths.append(path.replace("${key}", key))
    return paths


@pytest.mark.parametrize("name", sorted(PARAMS["experiments"]))
def test_packs_every_output_that_train_and_evaluate_declare_but_the_model(name):
    packed = gpu_runs.small_outputs(name)
    declared = [path for stage in ("train", "evaluate") for field in ("outs", "metrics", "plots")
                for path in _declared(stage, name, field)]
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
    with pytest.raises(SystemExit, match="stopped at the deadline"):
        # any stage: a deadline already passed stops it before it ends
        gpu_runs.run_stage("progress", "x", params=tmp_path / "p.yaml", logs=tmp_path, env={
            "PATH": "/usr/bin:/bin", "PYTHONSTARTUP": ""}, deadline=gpu_runs.Deadline(0.0))


def test_prepares_the_datasets_and_corruptions_an_experiment_reads():
    assert gpu_runs.data_needs(PARAMS, ["mnist_denoise"]) == (["mnist"], ["mnist_gaussian"])
    assert gpu_runs.data_needs(PARAMS, ["cifar10_cae_4pool", "mnist_cae"]) == (["cifar10", "mnist"], [])
    assert gpu_runs.data_needs(PARAMS, ["colored_mnist_cnn", "fashion_mnist_cnn"]) == (
        ["fashion_mnist", "mnist"], ["colored_mnist"])


def test_overrides_set_existing_params_and_refuse_unknown_keys():
    params = {"limits": {"max_epochs": None, "max_samples": None}, "experiments": {"a": {"training": {"epochs": 5}}}}
    gpu_runs.apply_overrides(params, ["limits.max_epochs=1", "experiments.a.training.epochs=2"])
    assert params["limits"]["max_epochs"] == 1 and params["experiments"]["a"]["training"]["epochs"] == 2
    with pytest.raises(ValueError, match="limits.max_epoch=1: expected KEY=VALUE"):
        gpu_runs.apply_overrides(params, ["limits.max_epoch=1"])
    with pytest.raises(ValueError, match="no section 'limitz'"):
        gpu_runs.apply_overrides(params, ["limitz.max_epochs=1"])
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        gpu_runs.apply_overrides(params, ["limits.max_epochs"])


def test_a_model_trained_here_at_this_commit_is_only_evaluated(tmp_path, monkeypatch):
    import json

    models, checkpoints = tmp_path / "models", tmp_path / "checkpoints"
    models.mkdir(), checkpoints.mkdir()
    (models / "model.keras").write_bytes(b"zip")
    (checkpoints / "state.json").write_text(json.dumps({"complete": True}))
    (models / "run.json").write_text(json.dumps({"run_id": "r", "trained": {"git_commit": "abc"}}))
    monkeypatch.setenv("IMAGEPIPE_SOURCE_COMMIT", "abc")
    assert gpu_runs.trained_here(models, checkpoints)
    monkeypatch.setenv("IMAGEPIPE_SOURCE_COMMIT", "def")  # another commit: train again
    assert not gpu_runs.trained_here(models, checkpoints)
    monkeypatch.delenv("IMAGEPIPE_SOURCE_COMMIT")  # no commit named: never trust what is there
    assert not gpu_runs.trained_here(models, checkpoints)
    monkeypatch.setenv("IMAGEPIPE_SOURCE_COMMIT", "abc")
    (checkpoints / "state.json").write_text(json.dumps({"complete": False, "epoch": 3}))  # killed mid-training
    assert not gpu_runs.trained_here(models, checkpoints)
