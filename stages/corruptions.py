"""Pure corruption functions: uint8 images and a seeded generator in, uint8 out.

Noise is computed on [0, 1] floats exactly as in the denoising question
(``x + factor * N(0, 1)``, clipped to [0, 1]) and then stored as uint8, so
the result differs from the float version by at most half a grey level
(1/510), far below the noise itself. Work is done in chunks so that CIFAR-10
never needs more than a few hundred MB of floats.
"""

from __future__ import annotations

import numpy as np

from stages.images import to_unit_float

CHUNK = 4096


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def gaussian(images: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise ``x + factor * N(0, 1)``, clipped to [0, 1]."""
    out = np.empty_like(images)
    for start in range(0, len(images), CHUNK):
        x = to_unit_float(images[start:start + CHUNK])
        x += np.float32(factor) * rng.standard_normal(x.shape, dtype=np.float32)
        out[start:start + CHUNK] = _to_uint8(x)
    return out


def salt_pepper(
    images: np.ndarray, amount: float, salt_vs_pepper: float, rng: np.random.Generator
) -> np.ndarray:
    """Set a fraction ``amount`` of pixel locations to white (salt) or black (pepper)."""
    out = images.copy()
    hit = rng.random(images.shape[:3]) < amount
    salt = rng.random(images.shape[:3]) < salt_vs_pepper
    out[hit & salt] = 255
    out[hit & ~salt] = 0
    return out


def colorize_channel(images: np.ndarray, rng: np.random.Generator,
                     allowed: tuple[int, ...] = (0, 1, 2)) -> tuple[np.ndarray, np.ndarray]:
    """Put each grey image into one random pure R, G or B channel out of
    ``allowed`` (0, 1, 2 = R, G, B); return (images, channels)."""
    _require_grey(images)
    channels = np.asarray(allowed)[rng.integers(0, len(allowed), size=len(images))]
    out = np.zeros(images.shape[:3] + (3,), dtype=np.uint8)
    out[np.arange(len(images)), ..., channels] = images[..., 0]
    return out, channels


def colorize_tint(images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Multiply each grey image by a random RGB colour whose brightest channel is 1."""
    _require_grey(images)
    colours = rng.random((len(images), 3), dtype=np.float32)
    colours /= colours.max(axis=1, keepdims=True)
    out = np.empty(images.shape[:3] + (3,), dtype=np.uint8)
    for start in range(0, len(images), CHUNK):
        grey = to_unit_float(images[start:start + CHUNK])
        out[start:start + CHUNK] = _to_uint8(grey * colours[start:start + CHUNK, None, None, :])
    return out, np.argmax(colours, axis=1)


LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601


def grayscale(images: np.ndarray) -> np.ndarray:
    """RGB to BT.601 luma, rounded, repeated in all three channels (same shape as the input)."""
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"grayscale needs RGB images (N, H, W, 3), got shape {images.shape}")
    out = np.empty_like(images)
    for start in range(0, len(images), CHUNK):
        luma = images[start:start + CHUNK].astype(np.float32) @ LUMA
        out[start:start + CHUNK] = np.rint(luma).astype(np.uint8)[..., None]
    return out


def dominant_channel(images: np.ndarray) -> np.ndarray:
    """For each RGB image, the channel (0, 1, 2) holding most of its intensity."""
    return images.reshape(len(images), -1, images.shape[-1]).sum(axis=1, dtype=np.int64).argmax(axis=1)


def _require_grey(images: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[3] != 1:
        raise ValueError(f"colorize needs grey images (N, H, W, 1), got shape {images.shape}")
