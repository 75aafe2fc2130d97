"""The dataset file every stage exchanges, and the one pixel scaling.

A dataset file is an uncompressed ``.npz`` holding, per split
(``train``/``val``/``test``), uint8 NHWC images and int64 labels, plus the class
names and a JSON ``meta`` record (source, split seed, ...). It is written
deterministically (fixed member order and timestamps) and atomically, so the
same content always gives the same bytes and DVC hash.

Images stay uint8 on disk and in memory. :func:`to_unit_float` is the only
place they become floats in [0, 1], and every consumer (train, evaluate,
metrics, plots) goes through it, so train and test images can never be
scaled differently (the bug behind the CIFAR-10 classifier question). It
refuses anything but uint8, so scaling twice is impossible too.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages import atomic
from stages.errors import PipelineError

SPLITS = ("train", "val", "test")
_EPOCH = (1980, 1, 1, 0, 0, 0)


class DatasetFileError(PipelineError):
    """A dataset file is missing, unreadable or inconsistent."""

    next_step = "rebuild it with dvc repro (or dvc pull, where a DVC remote holds it)"


UNIT_SCALE = np.float32(1.0 / 255.0)  # uint8 pixel -> [0, 1]


def to_unit_float(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1]. The single scaling used everywhere."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        dtype = getattr(images, "dtype", type(images).__name__)
        raise TypeError(f"to_unit_float expects uint8 pixels, got {dtype}: scale raw images exactly once")
    return np.multiply(images, UNIT_SCALE, dtype=np.float32)  # one pass; the same floats as astype, then multiply


def as_unit(images: np.ndarray) -> np.ndarray:
    """uint8 pixels scaled by :func:`to_unit_float`; float images (already in [0, 1]) as they are."""
    images = np.asarray(images)
    return to_unit_float(images) if images.dtype == np.uint8 else images


def tile(rows: list[np.ndarray], frames: np.ndarray | None = None, gap: int = 2) -> np.ndarray:
    """Rows of images (each NHWC, uint8 or floats in [0, 1], one or three
    channels) as one uint8 RGB picture, images ``gap`` pixels apart on white;
    ``frames`` (N, 3) uint8 colours a frame ``gap`` wide around each column's images."""
    count = min(len(row) for row in rows)
    height, width = rows[0].shape[1:3]
    cell_h, cell_w = height + 2 * gap, width + 2 * gap
    canvas = np.full((len(rows) * cell_h + gap, count * cell_w + gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        pixels = np.clip(np.rint(as_unit(row[:count]) * 255), 0, 255).astype(np.uint8)
        pixels = np.repeat(pixels, 3, axis=3) if pixels.shape[3] == 1 else pixels
        for c in range(count):
            top, left = r * cell_h + gap, c * cell_w + gap
            if frames is not None:
                canvas[top - gap:top + height + gap, left - gap:left + width + gap] = frames[c]
            canvas[top:top + height, left:left + width] = pixels[c]
    return canvas


@dataclass
class Split:
    images: np.ndarray  # uint8, (N, H, W, C)
    labels: np.ndarray  # int64, (N,)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 NHWC, got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels shape {self.labels.shape} does not match {self.images.shape[0]} images")

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class DatasetFile:
    splits: dict[str, Split]
    class_names: list[str]
    meta: dict = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(next(iter(self.splits.values())).images.shape[1:])


def save(path: Path, data: DatasetFile) -> None:
    """Write ``data`` to ``path`` atomically and byte-deterministically."""
    arrays: dict[str, np.ndarray] = {}
    for name in SPLITS:
        split = data.splits[name]
        arrays[f"{name}_images"] = np.ascontiguousarray(split.images)
        arrays[f"{name}_labels"] = split.labels.astype(np.int64)
    arrays["class_names"] = np.asarray(data.class_names, dtype=np.str_)
    arrays["meta"] = np.asarray(json.dumps(data.meta, sort_keys=True))
    with atomic.replacing(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key, array in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_EPOCH)
                info.external_attr = 0o644 << 16
                with archive.open(info, "w", force_zip64=True) as handle:
                    np.lib.format.write_array(handle, array, allow_pickle=False)


def load(path: Path | str, splits: Iterable[str] = SPLITS) -> DatasetFile:
    """Read a dataset file written by :func:`save`: its class names and meta,
    and the arrays of the named ``splits`` only (all by default; none with
    ``splits=()``). The file's members are read on demand, so a split left
    out costs neither time nor memory."""
    path = Path(path)
    names = tuple(splits)
    unknown = [name for name in names if name not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {', '.join(map(repr, unknown))}; a dataset file has {', '.join(SPLITS)}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            class_names = [str(c) for c in npz["class_names"]]
            meta = json.loads(str(npz["meta"]))
            loaded = {name: Split(npz[f"{name}_images"], npz[f"{name}_labels"]) for name in names}
    except FileNotFoundError:
        raise DatasetFileError(f"{path}: dataset file not found (run its prepare/corrupt stage)") from None
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DatasetFileError(f"{path}: not a valid dataset file ({exc})") from None
    return DatasetFile(loaded, class_names, meta)
