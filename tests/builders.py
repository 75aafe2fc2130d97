"""Tiny datasets in the real formats, built by the tests themselves.

Nothing here reads the shared mirror: IDX gz files, a CIFAR-10 python
archive, and image folders (dir, .tar.gz, .zip) are written from seeded
random arrays, so every test knows exactly what it should read back.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from stages.sources import SOURCES, RemoteFile


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_mirror(root: Path, mirror_dir: str = "mnist", n_train: int = 30, n_test: int = 12,
                     seed: int = 0) -> dict:
    """Write the four MNIST-style .gz files; return the arrays and payload checksums."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    folder = root / mirror_dir
    folder.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for stem, array in arrays.items():
        payload = idx_bytes(array)
        (folder / f"{stem}.gz").write_bytes(gzip.compress(payload, mtime=0))
        checksums[f"{stem}.gz"] = sha256(payload)
    return {"arrays": arrays, "checksums": checksums}


def pin_source(monkeypatch, name: str, checksums: dict[str, str], official_url: str | None = None):
    """Point a built-in source's pinned checksums (and host) at test fixtures."""
    spec = SOURCES[name]
    files = tuple(RemoteFile(f.name, checksums[f.name], f.payload) for f in spec.files)
    patched = replace(spec, files=files, official_url=official_url or spec.official_url)
    monkeypatch.setitem(SOURCES, name, patched)
    return patched


def cifar_archive(path: Path, per_batch: int = 4, seed: int = 0) -> dict:
    """Write a cifar-10-python.tar.gz look-alike; return arrays and its sha256."""
    rng = np.random.default_rng(seed)
    batches = {}
    with tarfile.open(path, "w:gz") as archive:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for name in names:
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, 10, per_batch)]
            batches[name] = (data, labels)
            blob = pickle.dumps({b"batch_label": name.encode(), b"labels": labels, b"data": data}, protocol=2)
            _add(archive, f"cifar-10-batches-py/{name}", blob)
        meta = pickle.dumps({b"label_names": [c.encode() for c in SOURCES["cifar10"].class_names]}, protocol=2)
        _add(archive, "cifar-10-batches-py/batches.meta", meta)
    return {"batches": batches, "sha256": sha256(path.read_bytes())}


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def image_folder(root: Path, classes=("cat", "dog", "owl"), per_class: int = 3, size=(8, 6),
                 mode: str = "RGB", suffix: str = ".png", splits=("train", "test"), seed: int = 0) -> dict:
    """Write ``<split>/<class>/<n><suffix>``; return {(split, class, n): pixels}."""
    rng = np.random.default_rng(seed)
    pixels = {}
    channels = 3 if mode == "RGB" else 1
    for split in splits:
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
                image = Image.fromarray(array[..., 0] if channels == 1 else array, mode)
                image.save(folder / f"{n:03d}{suffix}", quality=95)
                pixels[(split, cls, n)] = array
    return pixels


def tar_gz(folder: Path, path: Path, prefix: str = "") -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            archive.add(file, arcname=prefix + file.relative_to(folder).as_posix())
    return path


def zip_folder(folder: Path, path: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            archive.write(file, prefix + file.relative_to(folder).as_posix())
    return path
