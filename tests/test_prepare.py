import json
import shutil

import numpy as np
import pytest
from PIL import Image

import builders
from conftest import params_for
from stages import params as params_mod
from stages import prepare as prepare_mod
from stages.download import download
from stages.formats import FormatError
from stages.images import Split, load
from stages.prepare import carve_validation, cap, prepare, read_image_folder


def _run(dataset, project):
    """Run the prepare stage's entry point; return (exit code, output path)."""
    out = project / "data" / "prepared" / f"{dataset}.npz"
    code = prepare_mod.main([dataset, "--raw", f"data/raw/{dataset}", "--out", str(out)])
    return code, out


def _no_leftovers(project):
    return [p for p in project.rglob("*") if "partial" in p.name or ".tmp" in p.name]


def test_idx_through_download_and_prepare(project, monkeypatch):
    mirror = project / "mirror"
    made = builders.write_idx_mirror(mirror, n_train=30, n_test=12)
    builders.pin_source(monkeypatch, "mnist", made["checksums"])
    project.write(params_for({"mnist": {"source": {"builtin": "mnist"}, "split": {"val_fraction": 0.2, "seed": 3}}}))
    monkeypatch.setenv("DATA_MIRROR", str(mirror))
    download("mnist", project / "data/raw/mnist", params_mod.load())
    code, out = _run("mnist", project)
    assert code == 0
    data = load(out)
    assert data.meta["counts"] == {"train": 24, "val": 6, "test": 12}
    assert data.meta["source"] == "mnist" and data.image_shape == (28, 28, 1)
    # val and train partition the official train split, each keeping file order
    train_images = made["arrays"]["train-images-idx3-ubyte"]
    rejoined = np.concatenate([data.splits["train"].images, data.splits["val"].images])[..., 0]
    assert sorted(map(bytes, rejoined)) == sorted(map(bytes, train_images))
    assert np.array_equal(data.splits["test"].images[..., 0], made["arrays"]["t10k-images-idx3-ubyte"])
    assert np.array_equal(data.splits["test"].labels, np.arange(12) % 10)


def _raw_dir(project, name, files, fmt, source):
    raw = project / "data" / "raw" / name
    raw.mkdir(parents=True)
    for file, data in files.items():
        (raw / file).write_bytes(data)
    (raw / "manifest.json").write_text(json.dumps({"format": fmt, "source": source, "files": {f: "" for f in files}}))
    return raw


def test_idx_bad_magic_is_reported(project):
    import gzip
    project.write(params_for({"mnist": {"source": {"builtin": "mnist"}}}))
    good = builders.idx_bytes(np.zeros((4, 28, 28), np.uint8))
    labels = builders.idx_bytes(np.zeros(4, np.uint8))
    files = {
        "train-images-idx3-ubyte.gz": gzip.compress(labels),  # labels where images belong
        "train-labels-idx1-ubyte.gz": gzip.compress(labels),
        "t10k-images-idx3-ubyte.gz": gzip.compress(good),
        "t10k-labels-idx1-ubyte.gz": gzip.compress(labels),
    }
    _raw_dir(project, "mnist", files, "idx", "mnist")
    with pytest.raises(FormatError, match="train-images-idx3-ubyte.gz: bad IDX magic number 0x00000801"):
        prepare("mnist", project / "data/raw/mnist", params_mod.load())


def test_cifar_python_archive(project, monkeypatch, tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    made = builders.cifar_archive(archive, per_batch=4)
    builders.pin_source(monkeypatch, "cifar10", {"cifar-10-python.tar.gz": made["sha256"]})
    project.write(params_for({"cifar10": {"source": {"builtin": "cifar10"}, "split": {"val_fraction": 0.25}}}))
    _raw_dir(project, "cifar10", {archive.name: archive.read_bytes()}, "cifar_pickle", "cifar10")
    code, out = _run("cifar10", project)
    assert code == 0
    data = load(out)
    assert data.meta["counts"] == {"train": 15, "val": 5, "test": 4}
    assert data.class_names[0] == "airplane" and len(data.class_names) == 10
    test_data, test_labels = made["batches"]["test_batch"]
    assert np.array_equal(data.splits["test"].images, test_data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert data.splits["test"].labels.tolist() == test_labels


def test_cifar_archive_not_unpickled_before_checksum(project, monkeypatch, tmp_path, caplog):
    archive = tmp_path / "cifar-10-python.tar.gz"
    builders.cifar_archive(archive)
    builders.pin_source(monkeypatch, "cifar10", {"cifar-10-python.tar.gz": "0" * 64})
    project.write(params_for({"cifar10": {"source": {"builtin": "cifar10"}}}))
    _raw_dir(project, "cifar10", {archive.name: archive.read_bytes()}, "cifar_pickle", "cifar10")
    called = []
    monkeypatch.setattr(prepare_mod, "cifar_batch", lambda *a: called.append(a))
    code, out = _run("cifar10", project)
    assert code == 1 and not out.exists() and called == []
    assert "checksum mismatch" in caplog.text


@pytest.mark.parametrize("packing", ["dir", "tar.gz", "zip", "tar.gz-with-prefix"])
def test_image_folder_packings(project, tmp_path, packing):
    folder = tmp_path / "imgs"
    pixels = builders.image_folder(folder, classes=("owl", "cat", "dog"), per_class=3)
    if packing == "dir":
        path = folder
    elif packing == "zip":
        path = builders.zip_folder(folder, tmp_path / "imgs.zip")
    else:
        prefix = "top/" if "prefix" in packing else ""
        path = builders.tar_gz(folder, tmp_path / "imgs.tar.gz", prefix=prefix)
    project.write(params_for({"pets": {"source": {"path": str(path)}, "split": {"val_fraction": 0.0}}}))
    download("pets", project / "data/raw/pets", params_mod.load())
    code, out = _run("pets", project)
    assert code == 0
    data = load(out)
    assert data.class_names == ["cat", "dog", "owl"]  # class index from sorted names
    assert data.meta["counts"] == {"train": 9, "val": 0, "test": 9}
    test = data.splits["test"]
    assert test.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert np.array_equal(test.images[0], pixels[("test", "cat", 0)])  # PNG is lossless
    assert np.array_equal(test.images[8], pixels[("test", "owl", 2)])


def test_image_folder_val_split_is_used(tmp_path):
    folder = tmp_path / "imgs"
    builders.image_folder(folder, classes=("a", "b"), per_class=2, splits=("train", "validation", "test"))
    splits, classes = read_image_folder(folder, workers=1)
    assert {k: len(v) for k, v in splits.items()} == {"train": 4, "val": 4, "test": 4}


def test_grey_and_rgb_mixed_become_rgb(tmp_path):
    folder = tmp_path / "imgs"
    builders.image_folder(folder, classes=("a",), per_class=2, mode="L")
    rgb = np.full((6, 8, 3), 200, np.uint8)
    Image.fromarray(rgb).save(folder / "test" / "a" / "zz.png")
    splits, _ = read_image_folder(folder, workers=2)
    assert splits["train"].images.shape == (2, 6, 8, 3)
    grey = splits["train"].images[0]
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])


def test_all_grey_stays_single_channel(tmp_path):
    folder = tmp_path / "imgs"
    builders.image_folder(folder, classes=("a", "b"), per_class=2, mode="L")
    splits, _ = read_image_folder(folder, workers=1)
    assert splits["test"].images.shape == (4, 6, 8, 1)


def _bad_folder(tmp_path, change):
    folder = tmp_path / "imgs"
    builders.image_folder(folder, classes=("a", "b"), per_class=2, suffix=".jpg")
    change(folder)
    return folder


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: (f / "test/b/001.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg"),
         r"test/b/001.jpg: cannot decode image"),
        (lambda f: Image.new("RGB", (9, 9)).save(f / "train/a/big.jpg"),
         r"train/a/big.jpg: image is 9x9, but .* is 8x6"),
        (lambda f: shutil.rmtree(f / "test/b"), r"split 'test' is missing class folder\(s\) \['b'\]"),
        (lambda f: shutil.copytree(f / "test/b", f / "test/c"), r"split 'test' has class folder\(s\) \['c'\] that train lacks"),
        (lambda f: shutil.rmtree(f / "test"), r"no 'test' split folder"),
        (lambda f: shutil.copytree(f / "test", f / "holdout"), r"unknown split folder 'holdout'"),
    ],
)
def test_image_folder_errors_name_the_culprit(project, tmp_path, change, message):
    folder = _bad_folder(tmp_path, change)
    archive = builders.tar_gz(folder, tmp_path / "imgs.tar.gz")
    project.write(params_for({"pets": {"source": {"path": str(archive)}}}))
    download("pets", project / "data/raw/pets", params_mod.load())
    with pytest.raises(FormatError, match=message):
        prepare("pets", project / "data/raw/pets", params_mod.load())
    code, out = _run("pets", project)
    assert code == 1 and not out.exists() and _no_leftovers(project) == []


def test_missing_raw_folder_says_what_to_run(project):
    project.write(params_for({"mnist": {"source": {"builtin": "mnist"}}}))
    with pytest.raises(FormatError, match=r"manifest.json: not found; run download@mnist first"):
        prepare("mnist", project / "data/raw/mnist", params_mod.load())


def _split(n):
    return Split(np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1), np.arange(n))


def test_carve_validation_is_seeded_disjoint_and_ordered():
    train, val = carve_validation(_split(100), 0.2, seed=7)
    again_train, again_val = carve_validation(_split(100), 0.2, seed=7)
    other_train, _ = carve_validation(_split(100), 0.2, seed=8)
    assert len(train) == 80 and len(val) == 20
    assert np.array_equal(train.labels, again_train.labels) and np.array_equal(val.labels, again_val.labels)
    assert not np.array_equal(train.labels, other_train.labels)
    assert set(train.labels) | set(val.labels) == set(range(100)) and not set(train.labels) & set(val.labels)
    assert np.all(np.diff(train.labels) > 0)


def test_cap_is_a_seeded_random_subset():
    capped = cap(_split(100), 10, seed=0)
    assert len(capped) == 10 and np.all(np.diff(capped.labels) > 0)
    assert capped.labels.max() > 10  # not simply the first ten
    assert cap(_split(5), 10, seed=0).labels.tolist() == [0, 1, 2, 3, 4]
    assert cap(_split(5), None, seed=0).labels.tolist() == [0, 1, 2, 3, 4]


def test_max_samples_caps_every_split(project, tmp_path):
    folder = tmp_path / "imgs"
    builders.image_folder(folder, classes=("a", "b"), per_class=5)
    project.write(params_for({"pets": {"source": {"path": str(folder)}, "split": {"val_fraction": 0.2}}},
                             limits={"max_samples": 3}))
    download("pets", project / "data/raw/pets", params_mod.load())
    code, out = _run("pets", project)
    assert code == 0
    assert load(out).meta["counts"] == {"train": 3, "val": 2, "test": 3}


def test_max_samples_per_split_caps_only_the_splits_it_names(project, tmp_path):
    """Train on a subset, score on the whole test split: ``{train: 4, val: 1}``."""
    folder = tmp_path / "imgs"
    builders.image_folder(folder, classes=("a", "b"), per_class=5)
    project.write(params_for({"pets": {"source": {"path": str(folder)}, "split": {"val_fraction": 0.2}}},
                             limits={"max_samples": {"train": 4, "val": 1}}))
    download("pets", project / "data/raw/pets", params_mod.load())
    code, out = _run("pets", project)
    assert code == 0
    data = load(out)
    assert data.meta["counts"] == {"train": 4, "val": 1, "test": 10}
    assert data.meta["max_samples"] == {"train": 4, "val": 1}
