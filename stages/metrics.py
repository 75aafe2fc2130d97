"""Image-quality and classification metrics as pure numpy/scipy functions.

Kept free of Keras/TensorFlow so that evaluation, reports and tests can score
saved predictions without building a model, and so the numbers do not depend
on a backend's float32 kernels. Inputs are NHWC arrays: float in [0, 1], or
the uint8 pixels themselves, which are scaled by
:func:`stages.images.to_unit_float` one chunk at a time (the same numbers as
scaling them first). Everything is accumulated in float64 and processed in
chunks of images, so scoring the 10,000 CIFAR-10 test images never holds a
float copy of the test set (123 MB in float32) beyond the predictions.

Why several metrics: the questions this project answers compared autoencoders
by Keras' ``accuracy``, which for images is not a quality measure at all (see
:func:`keras_accuracy`). PSNR and SSIM are the usual reconstruction measures,
and :func:`pca_baseline_psnr` says what a linear model with the same latent
size achieves, so a convolutional autoencoder can be judged against it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
from scipy import linalg as sla
from scipy import ndimage

from stages.images import as_unit

logger = logging.getLogger(__name__)

CHUNK_VALUES = 1 << 21
"""Float values per chunk (about 16 MB in float64); SSIM keeps ~12 such arrays alive."""

MSE_FLOOR = 1e-10
"""Per-image MSE floor for PSNR: identical images give 100 dB instead of inf."""

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # 5, scipy's rule: an 11x11 window, as in Wang et al.
SSIM_WINDOW = 2 * SSIM_RADIUS + 1
# what evaluate writes beside its SSIM figures: metrics files without it come
# from the older convention (the whole map, the window reflected at the edges)
SSIM_CONVENTION = "wang2004-valid"
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(target: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    target, pred = np.asarray(target), np.asarray(pred)
    if target.shape != pred.shape:
        raise ValueError(f"target and prediction shapes differ: {target.shape} vs {pred.shape}")
    if target.size == 0:
        raise ValueError("cannot score empty arrays")
    return target, pred


def _chunks(n: int, values_per_image: int) -> Iterator[slice]:
    """Slices over the first axis holding about CHUNK_VALUES values each."""
    step = max(1, CHUNK_VALUES // max(1, values_per_image))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _values(chunk: np.ndarray) -> np.ndarray:
    """A chunk in float64: uint8 pixels scaled to [0, 1] first, floats as they are."""
    return np.asarray(as_unit(chunk), np.float64)


def _per_image_values(array: np.ndarray) -> int:
    return int(np.prod(array.shape[1:], dtype=np.int64)) if array.ndim > 1 else 1


def mse(target: np.ndarray, pred: np.ndarray) -> float:
    """Mean squared error over all values."""
    target, pred = _check_pair(target, pred)
    target, pred = np.atleast_1d(target), np.atleast_1d(pred)
    total = 0.0
    for part in _chunks(len(target), _per_image_values(target)):
        diff = _values(target[part]) - _values(pred[part])
        total += float(np.sum(np.square(diff)))
    return total / target.size


def bce(target: np.ndarray, pred: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, pred clipped to [eps, 1 - eps] as Keras does.

    This is the loss the questions' autoencoders were trained with; Keras
    clips probabilities by its ``epsilon()`` (1e-7) before taking logs.
    """
    target, pred = _check_pair(target, pred)
    target, pred = np.atleast_1d(target), np.atleast_1d(pred)
    total = 0.0
    for part in _chunks(len(target), _per_image_values(target)):
        t = _values(target[part])
        p = np.clip(_values(pred[part]), eps, 1.0 - eps)
        total -= float(np.sum(t * np.log(p) + (1.0 - t) * np.log1p(-p)))
    return total / target.size


def mse_per_image(target: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """MSE of each image (first axis), in float64."""
    target, pred = _check_pair(target, pred)
    if target.ndim < 2:
        raise ValueError(f"expected a batch of images, got shape {target.shape}")
    mses = np.empty(len(target), np.float64)
    for part in _chunks(len(target), _per_image_values(target)):
        diff = _values(target[part]) - _values(pred[part])
        mses[part] = np.mean(np.square(diff).reshape(len(diff), -1), axis=1)
    return mses


def psnr_per_image(target: np.ndarray, pred: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """PSNR in dB of each image (first axis), MSE floored at MSE_FLOOR."""
    mses = mse_per_image(target, pred)
    return 10.0 * np.log10(float(data_range) ** 2 / np.maximum(mses, MSE_FLOOR))


def psnr(target: np.ndarray, pred: np.ndarray, data_range: float = 1.0) -> float:
    """Mean over images of per-image PSNR in dB (not the PSNR of the pooled MSE)."""
    return float(np.mean(psnr_per_image(target, pred, data_range)))


def ssim(target: np.ndarray, pred: np.ndarray, data_range: float = 1.0) -> float:
    """Mean structural similarity of NHWC image batches, as Wang et al. (2004) define it.

    Local statistics use a Gaussian window (sigma 1.5, truncated to 11x11)
    over H and W only, so every channel is scored on its own; covariances are
    the window-weighted population ones, K1 = 0.01 and K2 = 0.03. Only the
    valid region of the SSIM map is kept, the pixels at least SSIM_RADIUS from
    every edge, where the whole window lies inside the image (18x18 of a 28x28
    digit, 22x22 of a 32x32 image). Each image scores the mean over that region
    and its channels; the result is the mean over images. That is
    scikit-image's ``structural_similarity(..., channel_axis=-1,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=data_range)`` averaged over the images (the tests check it);
    ``tf.image.ssim`` follows the same convention.

    Images smaller than SSIM_WINDOW on a side have no valid region and are refused.
    """
    target, pred = _check_pair(target, pred)
    if target.ndim != 4:
        raise ValueError(f"ssim expects NHWC batches, got shape {target.shape}")
    height, width = target.shape[1:3]
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} (its window), "
                         f"got {height}x{width}")
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    sigma = (0.0, SSIM_SIGMA, SSIM_SIGMA, 0.0)
    valid = (slice(None), slice(SSIM_RADIUS, height - SSIM_RADIUS), slice(SSIM_RADIUS, width - SSIM_RADIUS))

    def blur(a: np.ndarray) -> np.ndarray:
        # the mode only decides the cropped border, never a kept value
        return ndimage.gaussian_filter(a, sigma, mode="reflect", truncate=SSIM_TRUNCATE)[valid]

    total = 0.0
    for part in _chunks(len(target), _per_image_values(target)):
        x = _values(target[part])
        y = _values(pred[part])
        mu_x, mu_y = blur(x), blur(y)
        var_x = blur(x * x) - mu_x * mu_x
        var_y = blur(y * y) - mu_y * mu_y
        cov = blur(x * y) - mu_x * mu_y
        numerator = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
        denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
        total += float(np.sum(numerator / denominator))
    valid_values = (height - 2 * SSIM_RADIUS) * (width - 2 * SSIM_RADIUS) * target.shape[3]
    return total / (len(target) * valid_values)


def keras_accuracy(target: np.ndarray, pred: np.ndarray) -> float:
    """What Keras' ``metrics=['accuracy']`` reports for an autoencoder.

    Keras resolves the string ``'accuracy'`` from the output shape. With one
    channel it becomes binary accuracy: the share of values where the target
    equals ``pred > 0.5``, so only pixels that are exactly 0 or 1 can ever
    count. With three (or more) channels it becomes categorical accuracy: the
    share of *pixels* whose brightest channel in the target is also the
    brightest in the prediction (first index wins ties, as in numpy and
    Keras). That is what the CIFAR-10 question's 61% / 70% "accuracy" measured:
    how often the reconstruction got the dominant colour channel right, not
    how close the images are. It is reported only to relate to those numbers;
    use PSNR/SSIM to judge reconstructions.
    """
    target, pred = _check_pair(target, pred)
    if target.ndim < 2:
        raise ValueError(f"expected a channel axis, got shape {target.shape}")
    binary = target.shape[-1] == 1
    hits = 0
    for part in _chunks(len(target), _per_image_values(target)):
        if binary:
            hits += int(np.count_nonzero(_values(target[part]) == (_values(pred[part]) > 0.5)))
        else:
            hits += int(np.count_nonzero(np.argmax(target[part], -1) == np.argmax(pred[part], -1)))
    return hits / (target.size if binary else target.size // target.shape[-1])


def compression_ratio(input_shape: Sequence[int], latent_shape: Sequence[int]) -> float:
    """Input values per latent value (shapes without the batch axis)."""
    latent = int(np.prod(latent_shape, dtype=np.int64))
    if latent <= 0:
        raise ValueError(f"latent shape {tuple(latent_shape)} has no values")
    return int(np.prod(input_shape, dtype=np.int64)) / latent


PCA_TRAIN = 20_000  # train images a PCA is fitted on (the baseline and a linear_path model's start)


def pca_rows(n_images: int, max_train: int = PCA_TRAIN, seed: int = 0) -> np.ndarray:
    """The seeded, sorted subsample of train images that PCAs are fitted on."""
    return np.sort(np.random.default_rng(seed).permutation(n_images)[:max_train])


def pca_baseline_psnr(
    train: np.ndarray, test: np.ndarray, n_components: int, max_train: int = PCA_TRAIN, seed: int = 0
) -> float:
    """Mean test PSNR of a PCA reconstruction with ``n_components`` components."""
    return psnr_from_mse(pca_reconstruction_mse(train, test, n_components, max_train, seed))


def psnr_of_mse(per_image_mse: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Each image's PSNR in dB from its MSE (floored at ``MSE_FLOOR``)."""
    return 10.0 * np.log10(data_range**2 / np.maximum(np.asarray(per_image_mse, np.float64), MSE_FLOOR))


def psnr_from_mse(per_image_mse: np.ndarray, data_range: float = 1.0, pooled: bool = False) -> float:
    """Mean of per-image PSNR, or (``pooled``) the PSNR of the mean MSE over all images.

    Both are in use: the pooled figure is lower (Jensen's inequality), and it is
    the one behind the reference numbers quoted for this project's baselines.
    """
    if pooled:
        per_image_mse = np.maximum(np.asarray(per_image_mse, np.float64), MSE_FLOOR)
        return float(10.0 * np.log10(data_range**2 / per_image_mse.mean()))
    return float(np.mean(psnr_of_mse(per_image_mse, data_range)))


def pca_fit(train: np.ndarray, n_components: int, max_train: int = PCA_TRAIN, seed: int = 0
            ) -> tuple[np.ndarray, np.ndarray]:
    """Mean-centred PCA of flattened images: ``(mean, vectors)`` in float64,
    ``vectors`` of shape (values per image, ``n_components``), orthonormal columns.

    Fitted on at most ``max_train`` images (the subsample :func:`pca_rows`
    picks, so every caller with the same images and seed fits the same PCA); the
    covariance is accumulated chunk by chunk (never a float64 copy of the
    whole train set) and only the top eigenvectors are computed. uint8
    images are scaled by :func:`stages.images.to_unit_float` a chunk at a
    time (the same numbers as scaling them first, without a float copy of
    the train images: 245 MB for 20,000 CIFAR-10 images).
    """
    train = np.asarray(train)
    if train.ndim < 2:
        raise ValueError(f"PCA needs a batch of images, got shape {train.shape}")
    dim = _per_image_values(train)
    if not 1 <= n_components <= dim:
        raise ValueError(f"n_components must be in [1, {dim}], got {n_components}")
    if len(train) < 2:
        raise ValueError("PCA needs at least 2 train images")
    rows = pca_rows(len(train), max_train, seed)
    flat = train.reshape(len(train), dim)

    mean = np.zeros(dim, np.float64)
    for part in _chunks(len(rows), dim):
        mean += np.sum(_values(flat[rows[part]]), axis=0)
    mean /= len(rows)
    cov = np.zeros((dim, dim), np.float64)
    for part in _chunks(len(rows), dim):
        centred = _values(flat[rows[part]]) - mean
        cov += centred.T @ centred
    cov /= len(rows)
    _, vectors = sla.eigh(cov, subset_by_index=[dim - n_components, dim - 1], overwrite_a=True)
    logger.debug("PCA: %d components, %d train images, dim %d", n_components, len(rows), dim)
    return mean, vectors[:, ::-1].copy()  # largest variance first


def pca_reconstruction_mse(
    train: np.ndarray, test: np.ndarray, n_components: int, max_train: int = PCA_TRAIN, seed: int = 0,
    test_inputs: np.ndarray | None = None,
) -> np.ndarray:
    """Per-image test MSE of a PCA reconstruction with ``n_components`` components.

    The linear baseline for an autoencoder whose latent has the same number of
    values: :func:`pca_fit` on the train images, test images projected,
    reconstructed and clipped to [0, 1].

    With ``test_inputs`` (the corrupted images of a denoising task) those are
    projected instead and the reconstruction is scored against ``test``: the
    linear denoiser of the same latent size. At full rank it is the identity,
    so it then scores exactly like the corrupted input.
    """
    train, test = np.asarray(train), np.asarray(test)
    dim = _per_image_values(train)
    if train.ndim < 2 or test.ndim < 2 or _per_image_values(test) != dim:
        raise ValueError(f"train {train.shape} and test {test.shape} images differ in shape")
    if len(test) == 0:
        raise ValueError("PCA needs at least 1 test image")
    mean, vectors = pca_fit(train, n_components, max_train, seed)

    test_flat = test.reshape(len(test), dim)
    if test_inputs is None:
        input_flat = test_flat
    else:
        test_inputs = np.asarray(test_inputs)
        if test_inputs.shape != test.shape:
            raise ValueError(f"test inputs {test_inputs.shape} and targets {test.shape} differ in shape")
        input_flat = test_inputs.reshape(len(test), dim)
    errors = np.empty(len(test), np.float64)
    for part in _chunks(len(test), dim):
        original = _values(test_flat[part])
        codes = (_values(input_flat[part]) - mean) @ vectors
        recon = np.clip(codes @ vectors.T + mean, 0.0, 1.0)
        errors[part] = np.mean((original - recon) ** 2, axis=1)
    return errors


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 counts, rows = true class, columns = predicted class."""
    labels = np.asarray(labels).ravel().astype(np.int64)
    predictions = np.asarray(predictions).ravel().astype(np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.size} labels but {predictions.size} predictions")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got {values.min()}..{values.max()}")
    counts = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall of each class: diagonal over row sums, 0 for classes with no examples."""
    cm = np.asarray(cm)
    rows = cm.sum(axis=1).astype(np.float64)
    diagonal = np.diag(cm).astype(np.float64)
    return np.divide(diagonal, rows, out=np.zeros_like(rows), where=rows > 0)
