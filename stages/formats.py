"""Parsers for the raw formats, and the one prepared-dataset file format.

Pure functions over bytes and arrays: IDX (MNIST, Fashion-MNIST), the
CIFAR-10 python batches, single image files. Each raises :class:`FormatError`
naming the file and what is wrong with it.
"""

from __future__ import annotations

import io
import pickle
import warnings

import numpy as np
from PIL import Image

from stages.errors import PipelineError

MAX_IMAGE_PIXELS = 64 * 2**20  # a larger image is refused as a pixel bomb
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class FormatError(PipelineError):
    """A raw file does not hold what its format promises."""

    next_step = ("check datasets.<name>.source in params.yaml against the file, or fetch it again "
                 "(dvc repro -f download@<dataset>)")


# --- IDX -------------------------------------------------------------------

IDX_UBYTE = 0x08


def parse_idx(payload: bytes, name: str, ndim: int) -> np.ndarray:
    """Parse an uncompressed IDX payload of unsigned bytes with ``ndim`` dimensions."""
    if len(payload) < 4:
        raise FormatError(f"{name}: too short for an IDX header ({len(payload)} bytes)")
    zero, dtype, dims = int.from_bytes(payload[:2], "big"), payload[2], payload[3]
    expected_magic = (IDX_UBYTE << 8) | ndim
    if zero != 0 or dtype != IDX_UBYTE or dims != ndim:
        got = int.from_bytes(payload[:4], "big")
        raise FormatError(f"{name}: bad IDX magic number 0x{got:08x}, expected 0x{expected_magic:08x}")
    header = 4 + 4 * ndim
    if len(payload) < header:
        raise FormatError(f"{name}: truncated IDX header")
    shape = tuple(int.from_bytes(payload[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(payload) != expected:
        raise FormatError(
            f"{name}: IDX dimensions {shape} need {expected:,} bytes, file has {len(payload):,}"
        )
    return np.frombuffer(payload, dtype=np.uint8, offset=header).reshape(shape)


def idx_split(images: np.ndarray, labels: np.ndarray, names: tuple[str, str], num_classes: int):
    """Check an IDX images/labels pair and return (NHWC images, int labels)."""
    if images.shape[0] != labels.shape[0]:
        raise FormatError(
            f"{names[0]} has {images.shape[0]:,} images but {names[1]} has {labels.shape[0]:,} labels"
        )
    bad = labels >= num_classes
    if bad.any():
        raise FormatError(
            f"{names[1]}: label {int(labels[bad][0])} out of range 0..{num_classes - 1} "
            f"(first at index {int(np.argmax(bad))})"
        )
    return images[..., None], labels.astype(np.int64)


# --- CIFAR-10 python batches ------------------------------------------------

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, nothing that runs code."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def unpickle(data: bytes, name: str) -> dict:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # any failure of a hostile or broken pickle
        raise FormatError(f"{name}: not a valid CIFAR-10 batch ({exc})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{name}: not a valid CIFAR-10 batch (a {type(obj).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def cifar_batch(data: bytes, name: str, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 batch as (N, 32, 32, 3) uint8 images and int labels."""
    batch = unpickle(data, name)
    if "data" not in batch or "labels" not in batch:
        raise FormatError(f"{name}: CIFAR-10 batch lacks 'data' or 'labels'")
    pixels = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
        raise FormatError(f"{name}: 'data' is {pixels.dtype} {pixels.shape}, expected uint8 (N, 3072)")
    if pixels.shape[0] != labels.shape[0]:
        raise FormatError(f"{name}: {pixels.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise FormatError(f"{name}: labels outside 0..{num_classes - 1}")
    return pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


# --- image files -----------------------------------------------------------

def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode a PNG/JPEG to (H, W, 1) grey or (H, W, 3) RGB uint8."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                grey = image.mode in ("1", "L", "I", "I;16", "F") or (
                    image.mode in ("P", "LA") and _palette_is_grey(image)
                )
                image = image.convert("L" if grey else "RGB")
                pixels = np.asarray(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise FormatError(f"{name}: image too large, refused as a decompression bomb ({exc})") from None
    except Exception as exc:  # PIL raises many types for corrupt files
        raise FormatError(f"{name}: cannot decode image ({exc})") from None
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _palette_is_grey(image: Image.Image) -> bool:
    if image.mode == "LA":
        return True
    palette = image.getpalette() or []
    rgb = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
    return bool((rgb[:, 0] == rgb[:, 1]).all() and (rgb[:, 1] == rgb[:, 2]).all())
