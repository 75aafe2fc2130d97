"""Every metric the project reports, checked against an independent library on the same arrays.

SSIM and PSNR against scikit-image, the PCA baseline against scikit-learn's
``PCA``, the confusion matrix and per-class accuracy against
``sklearn.metrics`` (Keras' "accuracy" against Keras: tests/test_metrics.py).
A number in the report, the README or MLflow can then be compared with a paper
or another tool.
"""

import numpy as np
import pytest
import skimage.metrics as skimage_metrics  # the dev extra installs both: a missing one fails, never skips
import sklearn.decomposition as sklearn_decomposition
import sklearn.metrics as sklearn_metrics

from stages import metrics

SHAPES = [(6, 28, 28, 1), (6, 32, 32, 1), (6, 28, 28, 3), (6, 32, 32, 3)]


def _random_pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random(shape)
    return x, np.clip(x + 0.2 * rng.standard_normal(shape), 0, 1)


def _digit_pair(shape, seed=0, noise=0.5):
    """Bright strokes on a black background and their noisy copy (the denoising task's
    input): where SSIM over the whole map and over the valid region differ most."""
    rng = np.random.default_rng(seed)
    n, h, w, c = shape
    rows, cols = np.mgrid[:h, :w]
    digits = np.zeros(shape)
    for i in range(n):
        cy, cx = h / 2 + rng.uniform(-2, 2), w / 2 + rng.uniform(-2, 2)
        radius = np.hypot(rows - cy, cols - cx)
        ring = np.clip(1.5 - np.abs(radius - rng.uniform(5, 8)), 0, 1)  # a "0"
        bar = (np.abs(cols - cx) < 1.5) & (np.abs(rows - cy) < 9)  # a "1" across it
        digits[i] = np.maximum(ring, bar)[..., None] * rng.uniform(0.6, 1.0, c)
    return digits, np.clip(digits + noise * rng.standard_normal(shape), 0, 1)


def _skimage_ssim(target, pred):
    """Mean over images of scikit-image's SSIM with the settings of Wang et al. (2004)."""
    return float(np.mean([
        skimage_metrics.structural_similarity(
            t, p, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
        for t, p in zip(target, pred)
    ]))


# --- ssim --------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[1:])))
@pytest.mark.parametrize("pair", [_random_pair, _digit_pair])
def test_ssim_equals_scikit_image(shape, pair):
    target, pred = pair(shape)
    assert metrics.ssim(target, pred) == pytest.approx(_skimage_ssim(target, pred), abs=1e-6)


def test_ssim_of_the_clean_image_equals_scikit_image_too():
    """A reconstruction close to the digits: SSIM near 1, where the border counted most."""
    target, _ = _digit_pair((8, 28, 28, 1), seed=3)
    pred = np.clip(target + 0.03 * np.random.default_rng(4).standard_normal(target.shape), 0, 1)
    assert metrics.ssim(target, pred) == pytest.approx(_skimage_ssim(target, pred), abs=1e-6)


def test_ssim_of_uint8_targets_equals_scikit_image_on_their_scaled_values():
    """evaluate passes the uint8 test images; they are scored as /255 floats."""
    from stages.images import to_unit_float

    target, pred = _digit_pair((5, 28, 28, 1), seed=5)
    target_uint8 = np.round(target * 255).astype(np.uint8)
    expected = _skimage_ssim(to_unit_float(target_uint8).astype(np.float64), pred)
    assert metrics.ssim(target_uint8, pred) == pytest.approx(expected, abs=1e-6)


def test_ssim_in_chunks_equals_scikit_image(monkeypatch):
    """The chunked mean over images is the mean of per-image values (chunks of 3 of 7 images)."""
    target, pred = _digit_pair((7, 32, 32, 3), seed=6)
    monkeypatch.setattr(metrics, "CHUNK_VALUES", 3 * 32 * 32 * 3)
    assert metrics.ssim(target, pred) == pytest.approx(_skimage_ssim(target, pred), abs=1e-6)


# --- psnr --------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 28, 28, 1), (6, 32, 32, 3)], ids=["28x28x1", "32x32x3"])
def test_psnr_per_image_and_mean_equal_scikit_image(shape):
    target, pred = _digit_pair(shape, seed=7)
    pred[0] = np.clip(target[0] + 0.01, 0, 1)  # one image far better than the rest: the mean of dB counts
    expected = np.array([skimage_metrics.peak_signal_noise_ratio(t, p, data_range=1.0)
                         for t, p in zip(target, pred)])
    np.testing.assert_allclose(metrics.psnr_per_image(target, pred), expected, rtol=1e-12)
    assert metrics.psnr(target, pred) == pytest.approx(expected.mean(), rel=1e-12)
    assert metrics.psnr_from_mse(metrics.mse_per_image(target, pred)) == pytest.approx(expected.mean(), rel=1e-12)


# --- pca baseline -------------------------------------------------------------

def _digits(n, shape, seed):
    """Slightly noisy digits: black backgrounds, so reconstructions fall below 0 and are clipped."""
    return _digit_pair((n, *shape), seed, noise=0.05)[1]


def _sklearn_reconstruction(train, inputs, n_components):
    pca = sklearn_decomposition.PCA(n_components=n_components, svd_solver="full").fit(train.reshape(len(train), -1))
    recon = pca.inverse_transform(pca.transform(inputs.reshape(len(inputs), -1)))
    return np.clip(recon, 0.0, 1.0)


@pytest.mark.parametrize("shape", [(16, 16, 1), (12, 12, 3)], ids=["16x16x1", "12x12x3"])
def test_pca_reconstruction_equals_scikit_learn(shape):
    train, test = _digits(300, shape, seed=8), _digits(50, shape, seed=9)
    k = 6
    recon = _sklearn_reconstruction(train, test, k)
    expected = np.mean((test.reshape(len(test), -1) - recon) ** 2, axis=1)
    np.testing.assert_allclose(metrics.pca_reconstruction_mse(train, test, k), expected, rtol=1e-9)
    assert metrics.pca_baseline_psnr(train, test, k) == pytest.approx(
        np.mean(10 * np.log10(1 / expected)), rel=1e-9)


def test_pca_fit_spans_scikit_learns_components():
    shape = (16, 16, 1)
    train = _digits(300, shape, seed=10)
    mean, vectors = metrics.pca_fit(train, 6)
    pca = sklearn_decomposition.PCA(n_components=6, svd_solver="full").fit(train.reshape(len(train), -1))
    np.testing.assert_allclose(mean, pca.mean_, atol=1e-12)
    # the same components up to sign: equal projections
    np.testing.assert_allclose(vectors @ vectors.T, pca.components_.T @ pca.components_, atol=1e-8)


def test_pca_denoiser_equals_scikit_learn_on_the_noisy_inputs():
    shape = (16, 16, 1)
    train, test = _digits(300, shape, seed=11), _digits(40, shape, seed=12)
    noisy = np.clip(test + 0.2 * np.random.default_rng(13).standard_normal(test.shape), 0, 1)
    recon = _sklearn_reconstruction(train, noisy, 6)
    expected = np.mean((test.reshape(len(test), -1) - recon) ** 2, axis=1)
    np.testing.assert_allclose(metrics.pca_reconstruction_mse(train, test, 6, test_inputs=noisy), expected, rtol=1e-9)


# --- classification ---------------------------------------------------------

def test_confusion_matrix_and_per_class_accuracy_equal_scikit_learn():
    rng = np.random.default_rng(14)
    labels = rng.integers(0, 9, 500)  # class 9 never occurs: its accuracy is 0
    predictions = np.where(rng.random(500) < 0.7, labels, rng.integers(0, 10, 500))
    cm = metrics.confusion_matrix(labels, predictions, 10)
    np.testing.assert_array_equal(cm, sklearn_metrics.confusion_matrix(labels, predictions, labels=range(10)))
    recall = sklearn_metrics.recall_score(labels, predictions, labels=range(10), average=None, zero_division=0)
    np.testing.assert_allclose(metrics.per_class_accuracy(cm), recall, rtol=1e-12)
