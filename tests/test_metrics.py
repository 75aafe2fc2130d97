import math

import numpy as np
import pytest

from stages import metrics
from stages.metrics import (
    bce,
    compression_ratio,
    confusion_matrix,
    keras_accuracy,
    mse,
    pca_baseline_psnr,
    pca_reconstruction_mse,
    per_class_accuracy,
    psnr,
    psnr_from_mse,
    psnr_per_image,
    ssim,
)


def _images(n=4, h=16, w=16, c=3, seed=0):
    return np.random.default_rng(seed).random((n, h, w, c), dtype=np.float32)


# --- mse / bce ---------------------------------------------------------------

def test_mse_known_values():
    target = np.array([[0.0, 0.5], [1.0, 0.25]])
    pred = np.array([[0.5, 0.5], [0.0, 0.75]])
    assert mse(target, pred) == pytest.approx((0.25 + 0 + 1 + 0.25) / 4)
    assert mse(target, target) == 0.0


def test_bce_known_values_and_clipping():
    target = np.array([1.0, 0.0, 0.5, 1.0])
    pred = np.array([0.9, 0.2, 0.5, 0.0])  # the last one is clipped to eps
    eps = 1e-7
    expected = -np.mean([
        math.log(0.9),
        math.log(0.8),
        0.5 * math.log(0.5) + 0.5 * math.log(0.5),
        math.log(eps),
    ])
    assert bce(target, pred) == pytest.approx(expected, rel=1e-12)
    assert bce(target, pred, eps=1e-3) == pytest.approx(expected - math.log(1e-3) / 4 + math.log(eps) / 4)
    assert math.isfinite(bce(np.zeros(3), np.ones(3)))


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        mse(np.zeros((2, 3)), np.zeros((3, 2)))


# --- psnr --------------------------------------------------------------------

def test_psnr_of_constant_error_is_exactly_20_db():
    zeros = np.zeros((3, 8, 8, 1))
    assert psnr(zeros, np.full_like(zeros, 0.1)) == pytest.approx(20.0, abs=1e-9)
    assert psnr_per_image(zeros, np.full_like(zeros, 0.1)) == pytest.approx([20.0] * 3, abs=1e-9)


def test_psnr_identical_images_give_100_db_not_inf():
    x = _images()
    assert psnr(x, x) == pytest.approx(100.0)
    assert np.all(psnr_per_image(x, x.copy()) == pytest.approx(100.0))


def test_psnr_data_range_and_per_image_mean():
    zeros = np.zeros((2, 4, 4, 1))
    pred = np.stack([np.full((4, 4, 1), 25.5), np.full((4, 4, 1), 2.55)])  # 0..255 scale
    per_image = psnr_per_image(zeros, pred, data_range=255.0)
    assert per_image == pytest.approx([20.0, 40.0])
    assert psnr(zeros, pred, data_range=255.0) == pytest.approx(30.0)  # mean of dB, not of MSE
    assert psnr(zeros, np.full((2, 4, 4, 1), 0.2), data_range=2.0) == pytest.approx(20.0)


# --- ssim --------------------------------------------------------------------

def _reference_ssim_one_channel(x, y, data_range=1.0):
    """Direct 11x11 Gaussian-window SSIM, averaged where the window lies inside the image."""
    r = 5
    ax = np.arange(-r, r + 1)
    g = np.exp(-(ax**2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()

    def filt(a):
        padded = np.pad(a, r, mode="symmetric")
        out = np.zeros_like(a)
        for i in range(2 * r + 1):
            for j in range(2 * r + 1):
                out += window[i, j] * padded[i:i + a.shape[0], j:j + a.shape[1]]
        return out

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    ssim_map = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return np.mean(ssim_map[r:-r, r:-r])


def test_ssim_matches_direct_window_computation():
    x = _images(2, 20, 17, 2, seed=1).astype(np.float64)
    y = np.clip(x + 0.1 * np.random.default_rng(2).standard_normal(x.shape), 0, 1)
    expected = np.mean([
        _reference_ssim_one_channel(x[n, ..., c], y[n, ..., c]) for n in range(2) for c in range(2)
    ])
    assert ssim(x, y) == pytest.approx(expected, rel=1e-10)


def test_ssim_identical_symmetric_and_decreasing_with_noise():
    x = _images(3, 32, 32, 3)
    rng = np.random.default_rng(5)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    a = np.clip(x + 0.05 * rng.standard_normal(x.shape), 0, 1)
    b = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    assert ssim(x, a) == pytest.approx(ssim(a, x), abs=1e-12)
    assert 1.0 > ssim(x, a) > ssim(x, b) > 0.0


@pytest.mark.parametrize("m1, m2", [(0.2, 0.8), (0.5, 0.55), (0.0, 1.0)])
def test_ssim_of_constant_images_is_the_luminance_term(m1, m2):
    c1 = (0.01 * 1.0) ** 2
    x = np.full((2, 12, 12, 1), m1)
    y = np.full((2, 12, 12, 1), m2)
    assert ssim(x, y) == pytest.approx((2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1), rel=1e-9)


def test_ssim_needs_nhwc_images_the_window_fits_in():
    with pytest.raises(ValueError, match="NHWC"):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(np.zeros((2, 28, 10, 1)), np.zeros((2, 28, 10, 1)))


def test_chunking_does_not_change_results(monkeypatch):
    x = _images(7, 12, 12, 3, seed=3)
    y = np.clip(x + 0.1 * np.random.default_rng(4).standard_normal(x.shape), 0, 1).astype(np.float32)
    fns = (mse, bce, psnr, ssim, keras_accuracy)
    whole = [f(x, y) for f in fns]
    whole_pca = pca_baseline_psnr(x, y, 5)
    monkeypatch.setattr(metrics, "CHUNK_VALUES", 400)  # fewer values than one image: 1 image per chunk
    assert [f(x, y) for f in fns] == pytest.approx(whole, rel=1e-12)
    assert pca_baseline_psnr(x, y, 5) == pytest.approx(whole_pca, rel=1e-9)


# --- keras accuracy ----------------------------------------------------------

def _tie_heavy(shape, rng):
    return (rng.integers(0, 3, shape) / 2).astype(np.float32)  # 0, 0.5, 1: many channel ties


def test_keras_accuracy_matches_keras_categorical_and_binary():
    import keras
    rng = np.random.default_rng(0)
    for target, pred in [
        (rng.random((6, 8, 8, 3), dtype=np.float32), rng.random((6, 8, 8, 3), dtype=np.float32)),
        (_tie_heavy((6, 8, 8, 3), rng), _tie_heavy((6, 8, 8, 3), rng)),
    ]:
        m = keras.metrics.CategoricalAccuracy()
        m.update_state(target.reshape(-1, 3), pred.reshape(-1, 3))
        assert keras_accuracy(target, pred) == pytest.approx(float(m.result()), abs=1e-6)

    target = _tie_heavy((6, 8, 8, 1), rng)  # 0, 0.5 and 1: the 0.5s can never match
    pred = _tie_heavy((6, 8, 8, 1), rng) * rng.random((6, 8, 8, 1), dtype=np.float32) * 1.5
    pred[0, 0, :4, 0] = 0.5  # exactly at the threshold: not > 0.5
    m = keras.metrics.BinaryAccuracy()
    m.update_state(target, pred)
    expected = float(m.result())
    assert keras_accuracy(target, pred) == pytest.approx(expected, abs=1e-6)
    assert keras_accuracy(target, target) < 1.0  # 0.5 targets never match


@pytest.mark.parametrize("channels", [1, 3])
def test_keras_accuracy_is_what_compile_accuracy_reports(channels):
    import keras
    rng = np.random.default_rng(channels)
    shape = (8, 6, 6, channels)
    target = _tie_heavy(shape, rng)
    pred = rng.random(shape, dtype=np.float32)
    inputs = keras.Input(shape[1:])
    model = keras.Model(inputs, keras.layers.Identity()(inputs))  # predicts exactly its input
    model.compile(loss="mse", metrics=["accuracy"])
    reported = model.evaluate(pred, target, batch_size=4, verbose=0, return_dict=True)["accuracy"]
    assert keras_accuracy(target, pred) == pytest.approx(reported, abs=1e-6)


def test_keras_accuracy_hand_computed():
    target = np.array([[[[1.0, 0.0, 0.0], [0.2, 0.2, 0.1]]]])  # 2nd pixel: tie -> channel 0
    pred = np.array([[[[0.9, 0.95, 0.0], [0.5, 0.1, 0.1]]]])
    assert keras_accuracy(target, pred) == 0.5
    assert keras_accuracy(np.array([[[[0.0], [1.0], [0.4]]]]), np.array([[[[0.4], [0.6], [0.4]]]])) == pytest.approx(2 / 3)


# --- compression ratio -------------------------------------------------------

def test_compression_ratio():
    assert compression_ratio((32, 32, 3), (2, 2, 8)) == 96.0
    assert compression_ratio((28, 28, 1), (7, 7, 8)) == 2.0
    with pytest.raises(ValueError):
        compression_ratio((28, 28, 1), (0,))


# --- PCA baseline ------------------------------------------------------------

def test_pca_full_dimension_is_near_perfect():
    train, test = _images(50, 4, 4, 2, seed=1), _images(10, 4, 4, 2, seed=2)
    assert pca_baseline_psnr(train, test, 32) == pytest.approx(100.0, abs=0.5)


def test_pca_more_components_never_worse():
    train, test = _images(200, 6, 6, 1, seed=1), _images(30, 6, 6, 1, seed=2)
    scores = [pca_baseline_psnr(train, test, k) for k in (1, 2, 4, 8, 16, 36)]
    assert all(b >= a - 1e-9 for a, b in zip(scores, scores[1:]))
    assert scores[0] < 20 < 90 < scores[-1]


def test_pca_recovers_a_k_dimensional_subspace():
    rng = np.random.default_rng(0)
    dim, k = 48, 3
    basis = np.linalg.qr(rng.standard_normal((dim, k)))[0].T  # k orthonormal rows
    offset = rng.uniform(0.4, 0.6, dim)

    def sample(n):
        return (offset + rng.uniform(-0.1, 0.1, (n, k)) @ basis).reshape(n, 4, 4, 3).astype(np.float32)

    train, test = sample(300), sample(40)
    assert pca_baseline_psnr(train, test, k) > 90
    assert pca_baseline_psnr(train, test, k - 1) < 60


def test_pca_denoiser_removes_noise_off_the_subspace_and_is_identity_at_full_rank():
    rng = np.random.default_rng(3)
    dim, k = 48, 3
    basis = np.linalg.qr(rng.standard_normal((dim, k)))[0].T
    offset = rng.uniform(0.4, 0.6, dim)

    def sample(n):
        return (offset + rng.uniform(-0.1, 0.1, (n, k)) @ basis).reshape(n, 4, 4, 3)

    train, clean = sample(300), sample(40)
    noisy = np.clip(clean + rng.normal(0, 0.05, clean.shape), 0, 1)
    noisy_psnr = psnr_from_mse(np.mean((clean - noisy).reshape(40, -1) ** 2, axis=1))
    denoised = psnr_from_mse(pca_reconstruction_mse(train, clean, k, test_inputs=noisy))
    # keeping k of 48 directions keeps about k/48 of the noise energy: ~10 dB better
    assert denoised > noisy_psnr + 8
    full = pca_reconstruction_mse(train, clean, dim, test_inputs=noisy)
    assert psnr_from_mse(full) == pytest.approx(noisy_psnr, abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        pca_reconstruction_mse(train, clean, k, test_inputs=noisy[:, :2])


def test_pca_subsample_is_seeded_and_bounded():
    train, test = _images(120, 4, 4, 1, seed=1), _images(10, 4, 4, 1, seed=2)
    a = pca_baseline_psnr(train, test, 3, max_train=40, seed=7)
    assert a == pca_baseline_psnr(train, test, 3, max_train=40, seed=7)
    assert a != pca_baseline_psnr(train, test, 3, max_train=40, seed=8)
    with pytest.raises(ValueError, match="n_components"):
        pca_baseline_psnr(train, test, 17)


def test_pca_fits_the_rows_pca_rows_names():
    # train's linear_path start and evaluate's baseline both call pca_fit on all
    # train images: the subsample must be pca_rows', not a draw of its own
    train = _images(120, 4, 4, 1, seed=1)
    rows = metrics.pca_rows(120, 40, seed=7)
    assert len(rows) == 40 and np.all(np.diff(rows) > 0)
    for got, want in zip(metrics.pca_fit(train, 3, max_train=40, seed=7), metrics.pca_fit(train[rows], 3, 40)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(metrics.pca_rows(30, 40), np.arange(30))  # fewer images than the cap: all


# --- classification ----------------------------------------------------------

def test_confusion_matrix_and_per_class_accuracy_with_empty_row():
    labels = [0, 0, 0, 1, 1, 3]
    predictions = [0, 1, 0, 1, 3, 2]
    cm = confusion_matrix(labels, predictions, num_classes=4)
    assert cm.dtype == np.int64
    assert cm.tolist() == [
        [2, 1, 0, 0],
        [0, 1, 0, 1],
        [0, 0, 0, 0],  # class 2 never occurs
        [0, 0, 1, 0],
    ]
    acc = per_class_accuracy(cm)
    assert acc.dtype.kind == "f"
    assert acc == pytest.approx([2 / 3, 0.5, 0.0, 0.0])


def test_confusion_matrix_rejects_out_of_range():
    with pytest.raises(ValueError, match="predictions"):
        confusion_matrix([0, 1], [0, 2], num_classes=2)


def test_psnr_from_mse_mean_and_pooled():
    mses = np.array([0.01, 0.0001])  # 20 dB and 40 dB
    assert metrics.psnr_from_mse(mses) == pytest.approx(30.0)
    assert metrics.psnr_from_mse(mses, pooled=True) == pytest.approx(10 * np.log10(1 / 0.00505))
    assert metrics.psnr_from_mse(mses, pooled=True) < metrics.psnr_from_mse(mses)
    assert metrics.psnr_from_mse(np.array([0.0])) == pytest.approx(100.0)


def test_pca_reconstruction_mse_agrees_with_the_psnr_baseline():
    rng = np.random.default_rng(3)
    train, test = rng.random((60, 4, 4, 1)), rng.random((10, 4, 4, 1))
    errors = metrics.pca_reconstruction_mse(train, test, n_components=5)
    assert errors.shape == (10,) and np.all(errors >= 0)
    assert metrics.psnr_from_mse(errors) == pytest.approx(metrics.pca_baseline_psnr(train, test, 5))



@pytest.mark.parametrize("chunk_values", [None, 64 * 3 * 7])  # one chunk; chunks of 7 images
def test_pca_of_uint8_images_is_the_pca_of_their_scaled_floats(monkeypatch, chunk_values):
    """Scaled a chunk at a time (no float copy of the train images): the same
    mean and components, to the last bit, as scaling them all first."""
    from stages.images import to_unit_float

    train = np.random.default_rng(3).integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)
    if chunk_values:
        monkeypatch.setattr(metrics, "CHUNK_VALUES", chunk_values)
    want = metrics.pca_fit(to_unit_float(train), 5, max_train=200)
    got = metrics.pca_fit(train, 5, max_train=200)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert np.abs(got[0]).max() <= 1.0  # scaled: a mean of values in [0, 1]


@pytest.mark.parametrize("chunk_values", [None, 12 * 12 * 3 * 7])  # one chunk; chunks of 7 images
@pytest.mark.parametrize("channels", [1, 3])  # binary and categorical keras_accuracy
def test_uint8_targets_and_inputs_score_exactly_like_their_scaled_floats(monkeypatch, chunk_values, channels):
    """evaluate passes the uint8 test images (no float copy of the test set):
    every metric must give the same bits as with to_unit_float's floats."""
    from stages.images import to_unit_float

    if chunk_values:
        monkeypatch.setattr(metrics, "CHUNK_VALUES", chunk_values)
    rng = np.random.default_rng(5)
    target = rng.integers(0, 256, (30, 12, 12, channels), dtype=np.uint8)  # SSIM's window fits
    target[:3] = 255 * (target[:3] > 127)  # exact 0/1 pixels, the only ones binary accuracy can count
    noisy = rng.integers(0, 256, target.shape, dtype=np.uint8)
    output = rng.uniform(-0.1, 1.1, target.shape).astype(np.float32)  # unclipped, as a model's can be
    scaled, noisy_scaled = to_unit_float(target), to_unit_float(noisy)
    for fn in (mse, bce, ssim, keras_accuracy, metrics.mse_per_image, psnr_per_image):
        np.testing.assert_array_equal(fn(target, output), fn(scaled, output), err_msg=fn.__name__)
        np.testing.assert_array_equal(fn(target, noisy), fn(scaled, noisy_scaled), err_msg=fn.__name__)
    assert keras_accuracy(target, output) > 0
    train = rng.integers(0, 256, (40, 12, 12, channels), dtype=np.uint8)
    np.testing.assert_array_equal(pca_reconstruction_mse(train, target, 4, test_inputs=noisy),
                                  pca_reconstruction_mse(train, scaled, 4, test_inputs=noisy_scaled))


def test_mse_per_image_of_known_errors_in_float64():
    target = np.zeros((2, 2, 2, 1), np.float32)
    pred = np.stack([np.full((2, 2, 1), 1.5), np.full((2, 2, 1), -0.5)]).astype(np.float32)
    got = metrics.mse_per_image(target, pred)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, [2.25, 0.25])
    with pytest.raises(ValueError, match="batch of images"):
        metrics.mse_per_image(np.zeros(3), np.zeros(3))
