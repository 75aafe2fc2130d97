import numpy as np
import pytest

from conftest import params_for
from stages import corrupt as corrupt_mod
from stages import corruptions
from stages.images import DatasetFile, Split, load, save, to_unit_float


def _grey(n=64, seed=0, size=28):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


def test_gaussian_matches_the_seed_formula_within_quantisation():
    images = _grey()
    noisy = corruptions.gaussian(images, 0.5, np.random.default_rng(1))
    x = to_unit_float(images)
    reference = np.clip(x + 0.5 * np.random.default_rng(1).standard_normal(x.shape, dtype=np.float32), 0, 1)
    assert noisy.dtype == np.uint8 and noisy.shape == images.shape
    assert np.abs(to_unit_float(noisy) - reference).max() <= 1 / 510 + 1e-6


def test_gaussian_noise_level():
    images = np.full((200, 28, 28, 1), 128, np.uint8)  # mid-grey: clipping is rare
    noise = to_unit_float(corruptions.gaussian(images, 0.1, np.random.default_rng(0))) - 128 / 255
    assert abs(noise.mean()) < 0.005 and abs(noise.std() - 0.1) < 0.005
    assert np.array_equal(corruptions.gaussian(images, 0.0, np.random.default_rng(0)), images)


def test_salt_and_pepper_fraction():
    images = np.full((100, 28, 28, 3), 128, np.uint8)
    out = corruptions.salt_pepper(images, 0.2, 0.5, np.random.default_rng(0))
    changed = (out != 128).any(axis=3)
    assert abs(changed.mean() - 0.2) < 0.01
    values = out[changed]
    assert set(np.unique(values)) == {0, 255}
    assert np.all(values.min(axis=1) == values.max(axis=1))  # all channels of a hit pixel agree


def test_colorize_channel_is_one_pure_channel():
    images = _grey(300)
    out, channels = corruptions.colorize_channel(images, np.random.default_rng(0))
    assert out.shape == (300, 28, 28, 3)
    for i in (0, 1, 299):
        assert np.array_equal(out[i, ..., channels[i]], images[i, ..., 0])
        others = [c for c in range(3) if c != channels[i]]
        assert not out[i][..., others].any()
    share = np.bincount(channels, minlength=3) / 300
    assert np.all(np.abs(share - 1 / 3) < 0.07)


def test_colorize_tint_keeps_shape_and_brightest_channel():
    images = np.full((50, 4, 4, 1), 255, np.uint8)
    out, brightest = corruptions.colorize_tint(images, np.random.default_rng(0))
    assert np.all(out.max(axis=3) == 255)
    assert np.array_equal(out[:, 0, 0].argmax(axis=1), brightest)


def test_colorize_refuses_rgb():
    with pytest.raises(ValueError, match=r"colorize needs grey images"):
        corruptions.colorize_channel(np.zeros((2, 4, 4, 3), np.uint8), np.random.default_rng(0))


def _prepared(project, n=(40, 10, 20), channels=1):
    splits = {
        name: Split(np.random.default_rng(i).integers(0, 256, (k, 28, 28, channels), dtype=np.uint8),
                    np.arange(k) % 10)
        for i, (name, k) in enumerate(zip(("train", "val", "test"), n))
    }
    path = project / "data/prepared/toy.npz"
    save(path, DatasetFile(splits, [str(i) for i in range(10)], {"dataset": "toy"}))
    return path


def _params(project, **corruption):
    project.write(params_for(
        {"toy": {"source": {"path": "unused.zip"}}},
        corruptions={"c": {"dataset": "toy", "seed": 0, **corruption}},
    ))


@pytest.mark.parametrize("cfg", [
    {"kind": "gaussian", "factor": 0.5},
    {"kind": "salt_pepper", "amount": 0.1},
    {"kind": "colorize", "mode": "channel"},
    {"kind": "colorize", "mode": "tint"},
])
def test_same_params_give_byte_identical_files(project, cfg):
    _prepared(project)
    _params(project, **cfg)
    assert corrupt_mod.main(["c", "--out", "a.npz"]) == 0
    assert corrupt_mod.main(["c", "--out", "b.npz"]) == 0
    assert (project / "a.npz").read_bytes() == (project / "b.npz").read_bytes()
    _params(project, **{**cfg, "seed": 1})
    assert corrupt_mod.main(["c", "--out", "c.npz"]) == 0
    assert (project / "a.npz").read_bytes() != (project / "c.npz").read_bytes()


def test_output_keeps_labels_and_records_the_corruption(project):
    _prepared(project)
    _params(project, kind="colorize", mode="channel")
    assert corrupt_mod.main(["c"]) == 0
    out = load(project / "data/corrupted/c.npz")
    source = load(project / "data/prepared/toy.npz")
    assert out.image_shape == (28, 28, 3)
    for name in ("train", "val", "test"):
        assert np.array_equal(out.splits[name].labels, source.splits[name].labels)
    assert out.meta["corruption"]["kind"] == "colorize" and out.meta["dataset"] == "toy"
    assert len(out.meta["train_channel_share_rgb"]) == 3


def test_test_noise_does_not_depend_on_train_size(project):
    _prepared(project, n=(40, 10, 20))
    _params(project, kind="gaussian", factor=0.5)
    corrupt_mod.main(["c", "--out", "small.npz"])
    _prepared(project, n=(80, 10, 20))
    corrupt_mod.main(["c", "--out", "big.npz"])
    assert np.array_equal(load(project / "small.npz").splits["test"].images,
                          load(project / "big.npz").splits["test"].images)


def test_colorize_on_rgb_dataset_fails_cleanly(project, caplog):
    _prepared(project, channels=3)
    _params(project, kind="colorize")
    assert corrupt_mod.main(["c"]) == 1
    assert "colorize needs a grey dataset, but 'toy' has 3 channels" in caplog.text
    assert not (project / "data/corrupted").exists() or not any((project / "data/corrupted").iterdir())


def test_missing_input_says_what_to_run(project, caplog):
    _params(project, kind="gaussian")
    assert corrupt_mod.main(["c"]) == 1
    assert "toy.npz: dataset file not found (run its prepare/corrupt stage)" in caplog.text


def test_grayscale_is_bt601_luma_in_three_equal_channels():
    rgb = np.array([[[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 200, 30]]]], np.uint8)
    grey = corruptions.grayscale(rgb)
    assert grey.shape == rgb.shape and grey.dtype == np.uint8
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    expected = np.rint(rgb.astype(np.float64) @ [0.299, 0.587, 0.114])
    assert np.array_equal(grey[..., 0], expected.astype(np.uint8))  # 76, 150, 29, 124
    with pytest.raises(ValueError, match="grayscale needs RGB images"):
        corruptions.grayscale(_grey(2))


def test_colorize_channel_keeps_to_the_allowed_channels():
    images, channels = corruptions.colorize_channel(_grey(300), np.random.default_rng(0), allowed=(0,))
    assert set(channels) == {0} and not images[..., 1:].any()
    assert np.array_equal(corruptions.dominant_channel(images), channels)
    # all three allowed: the same draw as before the option existed (colored_mnist stays the same file)
    _, before = corruptions.colorize_channel(_grey(300), np.random.default_rng(5))
    assert np.array_equal(before, np.random.default_rng(5).integers(0, 3, size=300))


def test_train_channels_colour_train_and_val_only(project):
    _prepared(project, n=(60, 30, 60))
    _params(project, kind="colorize", mode="channel", train_channels=["green"])
    assert corrupt_mod.main(["c"]) == 0
    out = load(project / "data/corrupted/c.npz")
    for name in ("train", "val"):
        assert set(corruptions.dominant_channel(out.splits[name].images)) == {1}
    assert set(corruptions.dominant_channel(out.splits["test"].images)) == {0, 1, 2}
    assert out.meta["train_channel_share_rgb"] == [0.0, 1.0, 0.0]


def test_grayscale_stage_refuses_grey_data(project, caplog):
    _prepared(project)
    _params(project, kind="grayscale")
    assert corrupt_mod.main(["c"]) == 1
    assert "grayscale needs a colour dataset, but 'toy' has 1 channel(s)" in caplog.text
    _prepared(project, channels=3)
    assert corrupt_mod.main(["c"]) == 0
    out = load(project / "data/corrupted/c.npz")
    assert out.image_shape == (28, 28, 3) and out.meta["corruption"]["kind"] == "grayscale"
