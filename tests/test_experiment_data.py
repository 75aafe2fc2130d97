"""stages.experiment_data: an experiment's splits read from its dataset files, held once."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from stages.errors import PipelineError
from stages.experiment_data import ExperimentData
from stages.experiment_params import Experiment
from stages.images import DatasetFile, Split, save

COUNTS = {"train": 900, "val": 100, "test": 200}


def _file(path, seed: int, counts=COUNTS, shape=(16, 16, 3)) -> dict[str, Split]:
    rng = np.random.default_rng(seed)
    splits = {name: Split(rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 3, n))
              for name, n in counts.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save(path, DatasetFile(splits, ["a", "b", "c"], {"source": f"toy{seed}"}))
    return splits


def _experiment(task: str, input: str = "prepared/toy") -> Experiment:
    model = ({"kind": "conv_autoencoder", "filters": [4], "poolings": 1} if task == "autoencoder"
             else {"kind": "cnn", "conv": [{"filters": 4}], "dense": [8]})
    loss = "mse" if task == "autoencoder" else "sparse_categorical_crossentropy"
    return Experiment.model_validate({
        "task": task, "model": model, "training": {"loss": loss, "epochs": 1, "batch_size": 8},
        "data": {"input": input, "target": "prepared/toy", "train_on": "train+val", "validate_on": "test"}})


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_classifier_splits_are_the_files_arrays_joined(project):
    splits = _file(project / "data/prepared/toy.npz", seed=0)
    data = ExperimentData("toy_cls", _experiment("classifier"))
    assert data.class_names == ["a", "b", "c"] and data.source == "toy0"
    train, val = data.training()
    assert np.array_equal(train.x, np.concatenate([splits["train"].images, splits["val"].images]))
    assert np.array_equal(train.y, np.concatenate([splits["train"].labels, splits["val"].labels]))
    assert np.array_equal(val.x, splits["test"].images) and np.array_equal(val.y, splits["test"].labels)
    with pytest.raises(ValueError, match="toy_cls is a classifier"):
        data.target_images("test")


def test_training_holds_each_split_once(project):
    """Once ``training()`` has returned, the process holds the arrays it
    returned and little more: not the train and val parts it joined."""
    _file(project / "data/prepared/toy.npz", seed=0)
    tracemalloc.start()
    try:
        data = ExperimentData("toy_cls", _experiment("classifier"))  # kept, as the train stage keeps it
        train, val = data.training()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    returned = train.x.nbytes + train.y.nbytes + val.x.nbytes + val.y.nbytes  # 1.0 MB
    assert returned <= held < returned + 100_000  # the joined-away parts alone would add 0.7 MB


def test_autoencoder_targets(project):
    clean = _file(project / "data/prepared/toy.npz", seed=0)
    noisy = _file(project / "data/corrupted/noisy.npz", seed=1)
    plain = ExperimentData("ae", _experiment("autoencoder"))
    test = plain.split("test")
    assert test.y is test.x and np.array_equal(test.x, clean["test"].images)
    denoise = ExperimentData("dn", _experiment("autoencoder", input="corrupted/noisy"))
    test = denoise.split("test")
    assert np.array_equal(test.x, noisy["test"].images) and np.array_equal(test.y, clean["test"].images)
    assert np.array_equal(denoise.target_images("train", "val"),
                          np.concatenate([clean["train"].images, clean["val"].images]))
    assert denoise.source == "toy1"  # the input file's


def test_mismatched_target_file_is_named(project):
    _file(project / "data/prepared/toy.npz", seed=0)
    _file(project / "data/corrupted/noisy.npz", seed=1, counts={**COUNTS, "test": 150})
    exp = _experiment("autoencoder", input="corrupted/noisy")
    data = ExperimentData("dn", exp)
    data.split("train")  # the train splits agree
    with pytest.raises(PipelineError, match=r"experiments.dn: input corrupted/noisy has 150 test images but "
                                            r"target prepared/toy has 200"):
        data.split("test")


def test_missing_target_file_fails_at_once(project):
    _file(project / "data/corrupted/noisy.npz", seed=1)
    exp = _experiment("autoencoder", input="corrupted/noisy")
    with pytest.raises(PipelineError, match=r"data/prepared/toy.npz: dataset file not found"):
        ExperimentData("dn", exp)
