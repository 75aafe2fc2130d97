import re
from pathlib import Path

import numpy as np
import pytest

from stages.images import DatasetFile, DatasetFileError, Split, load, save, to_unit_float

STAGES = Path(__file__).resolve().parents[1] / "stages"


def _dataset(n=5, seed=0):
    rng = np.random.default_rng(seed)
    splits = {
        name: Split(rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), np.arange(n) % 2)
        for name in ("train", "val", "test")
    }
    return DatasetFile(splits, ["a", "b"], {"dataset": "toy"})


def test_to_unit_float_exact_range():
    x = to_unit_float(np.array([0, 1, 128, 255], np.uint8))
    assert x.dtype == np.float32
    assert x[0] == 0.0 and x[-1] == 1.0
    assert np.allclose(x, [0, 1 / 255, 128 / 255, 1], atol=1e-7)


def test_to_unit_float_is_the_float32_product_bit_for_bit():
    """Every pixel value scales to float32(value) * float32(1/255), rounded
    once: what a float32 cast and a multiply (the seed scripts' ``/ 255.0``
    in float32 aside) give, so results do not move with the implementation."""
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = np.array([np.float32(v) * np.float32(1.0 / 255.0) for v in range(256)], np.float32).reshape(16, 16)
    assert to_unit_float(pixels).view(np.uint32).tolist() == expected.view(np.uint32).tolist()


@pytest.mark.parametrize("bad", [np.zeros(3, np.float32), np.zeros(3, np.int64), [0, 255]])
def test_to_unit_float_refuses_anything_but_uint8(bad):
    with pytest.raises(TypeError, match="expects uint8"):
        to_unit_float(bad)


def test_train_and_test_are_scaled_identically():
    data = _dataset()
    data.splits["test"].images[:] = data.splits["train"].images  # the same pixels in both
    train, test = (to_unit_float(data.splits[s].images) for s in ("train", "test"))
    assert np.array_equal(train, test)
    assert 0.0 <= train.min() and train.max() <= 1.0
    with pytest.raises(TypeError):  # scaling an already scaled split fails loudly
        to_unit_float(test)


def test_no_other_code_scales_pixels():
    """The seed bug: test images not scaled like train. Only images.py may divide by 255."""
    pattern = re.compile(r"/\s*255|\*\s*\(?1\.?0?\s*/\s*255")
    offenders = [
        f"{path.name}:{n}"
        for path in STAGES.glob("*.py") if path.name != "images.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_save_load_round_trip_and_determinism(tmp_path):
    data = _dataset()
    save(tmp_path / "a.npz", data)
    save(tmp_path / "b.npz", _dataset())
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    back = load(tmp_path / "a.npz")
    assert back.class_names == ["a", "b"] and back.meta == {"dataset": "toy"}
    for name, split in data.splits.items():
        assert np.array_equal(back.splits[name].images, split.images)
        assert back.splits[name].labels.dtype == np.int64
    assert not list(tmp_path.glob(".*partial*"))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetFileError, match=r"missing.npz: dataset file not found"):
        load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetFileError, match=r"junk.npz: not a valid dataset file"):
        load(tmp_path / "junk.npz")


def test_split_validates_shapes():
    with pytest.raises(ValueError, match="uint8 NHWC"):
        Split(np.zeros((2, 4, 4), np.uint8), np.zeros(2))
    with pytest.raises(ValueError, match="does not match 2 images"):
        Split(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(3))


def test_load_reads_only_the_named_splits(tmp_path):
    import tracemalloc

    rng = np.random.default_rng(1)
    splits = {name: Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 2)
              for name, n in (("train", 400), ("val", 50), ("test", 100))}
    save(tmp_path / "d.npz", DatasetFile(splits, ["a", "b"], {"dataset": "toy"}))
    info = load(tmp_path / "d.npz", splits=())
    assert info.splits == {} and info.class_names == ["a", "b"] and info.meta == {"dataset": "toy"}
    tracemalloc.start()
    try:
        test = load(tmp_path / "d.npz", splits=("test",))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert list(test.splits) == ["test"]
    assert np.array_equal(test.splits["test"].images, splits["test"].images)
    # the test split's 307 kB and little else; the train split alone is 1.2 MB
    assert held < splits["test"].images.nbytes + 100_000
    with pytest.raises(ValueError, match="unknown split.*'training'"):
        load(tmp_path / "d.npz", splits=("training",))


def test_tile_lays_rows_of_images_out_on_white_with_coloured_frames():
    from stages.images import tile

    grey = np.full((3, 4, 5, 1), 10, np.uint8)
    floats = np.full((2, 4, 5, 3), 1.0, np.float32)  # a row of floats in [0, 1]; the shortest row sets the count
    picture = tile([grey, floats], gap=2)
    assert picture.shape == (2 * (4 + 4) + 2, 2 * (5 + 4) + 2, 3) and picture.dtype == np.uint8
    assert (picture[2:6, 2:7] == 10).all() and (picture[10:14, 2:7] == 255).all()
    assert (picture[0:2] == 255).all() and (picture[6:10, 2:7] == 255).all()  # the gaps stay white
    framed = tile([grey[:2]], frames=np.array([[200, 0, 0], [0, 200, 0]], np.uint8), gap=2)
    assert tuple(framed[0, 0]) == (200, 0, 0) and tuple(framed[0, 9 + 2]) == (0, 200, 0)
    assert (framed[2:6, 2:7] == 10).all()
