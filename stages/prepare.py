"""DVC stage ``prepare@<dataset>``: raw files -> one dataset file.

Reads ``data/raw/<dataset>/`` (its manifest says the format), parses IDX,
CIFAR-10 python batches or an image folder (``<split>/<class>/<image>``,
decoded in parallel while the archive streams), carves a seeded validation
split out of train when the source has none, applies ``limits.max_samples``
per split, and writes ``data/prepared/<dataset>.npz`` (see stages.images).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np

from stages import cli, params as params_mod
from stages.archives import gunzip, members
from stages.fetch import check_sha256
from stages.formats import IMAGE_SUFFIXES, FormatError, cifar_batch, decode_image, idx_split, parse_idx
from stages.images import DatasetFile, Split, save
from stages.progress import Progress
from stages.sources import IDX_SPLITS, MANIFEST, SOURCES

log = logging.getLogger("stages.prepare")

SPLIT_DIRS = {"train": "train", "test": "test", "val": "val", "validation": "val"}
CHUNK = 2048


# --- readers: raw folder -> {split: Split}, class names ---------------------

def read_idx(raw: Path, source: str) -> tuple[dict[str, Split], list[str]]:
    classes = list(SOURCES[source].class_names)
    splits = {}
    for split, (images_file, labels_file) in IDX_SPLITS.items():
        images_payload, _ = gunzip(raw / images_file)
        labels_payload, _ = gunzip(raw / labels_file)
        images = parse_idx(images_payload, images_file, ndim=3)
        labels = parse_idx(labels_payload, labels_file, ndim=1)
        splits[split] = Split(*idx_split(images, labels, (images_file, labels_file), len(classes)))
    return splits, classes


def read_cifar(raw: Path, source: str) -> tuple[dict[str, Split], list[str]]:
    spec = SOURCES[source]
    archive = raw / spec.files[0].name
    # The pinned checksum is verified again before any batch is unpickled.
    check_sha256(archive, spec.files[0].sha256, str(archive))
    parts: dict[str, list] = defaultdict(list)
    for name, data in members(archive):
        base = PurePosixPath(name).name
        if base.startswith("data_batch_"):
            parts["train"].append((base, cifar_batch(data, f"{archive}:{name}")))
        elif base == "test_batch":
            parts["test"].append((base, cifar_batch(data, f"{archive}:{name}")))
    if len(parts["train"]) != 5 or len(parts["test"]) != 1:
        raise FormatError(f"{archive}: expected 5 data_batch_* and 1 test_batch, "
                          f"found {len(parts['train'])} and {len(parts['test'])}")
    splits = {}
    for split, batches in parts.items():
        batches.sort()
        splits[split] = Split(np.concatenate([b[1][0] for b in batches]),
                              np.concatenate([b[1][1] for b in batches]))
    return splits, list(spec.class_names)


def _decode_chunk(names: list[str], blobs: list[bytes]) -> np.ndarray:
    """Decode one chunk of images to a stacked uint8 array (runs in a worker)."""
    images = [decode_image(blob, name) for name, blob in zip(names, blobs)]
    return _stack(images, names)


def _stack(images: list[np.ndarray], names: list[str]) -> np.ndarray:
    size = images[0].shape[:2]
    for image, name in zip(images, names):
        if image.shape[:2] != size:
            raise FormatError(
                f"{name}: image is {image.shape[1]}x{image.shape[0]}, "
                f"but {names[0]} is {size[1]}x{size[0]}; all images must share one size"
            )
    if len({image.shape[2] for image in images}) > 1:  # mixed grey and RGB: promote to RGB
        images = [np.repeat(i, 3, axis=2) if i.shape[2] == 1 else i for i in images]
    return np.stack(images)


def _layout(names: list[str], source: str) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """(split, class) per image name and the class names per split; checks the layout."""
    prefixes, keys = set(), []
    for name in names:
        parts = PurePosixPath(name).parts
        if len(parts) < 3:
            raise FormatError(f"{source}: {name!r} is not laid out <split>/<class>/<image>")
        prefixes.add(parts[:-3])
        split = SPLIT_DIRS.get(parts[-3])
        if split is None:
            raise FormatError(
                f"{source}: unknown split folder {parts[-3]!r} in {name!r} (expected train, val or test)"
            )
        keys.append((split, parts[-2]))
    if len(prefixes) > 1:
        raise FormatError(f"{source}: split folders found at different depths: {sorted(prefixes)[:3]}")
    classes: dict[str, set] = defaultdict(set)
    for split, cls in keys:
        classes[split].add(cls)
    for required in ("train", "test"):
        if required not in classes:
            raise FormatError(f"{source}: no '{required}' split folder")
    reference = classes["train"]
    for split, found in classes.items():
        if missing := sorted(reference - found):
            raise FormatError(f"{source}: split '{split}' is missing class folder(s) {missing}")
        if extra := sorted(found - reference):
            raise FormatError(f"{source}: split '{split}' has class folder(s) {extra} that train lacks")
    return keys, {s: sorted(c) for s, c in classes.items()}


def read_image_folder(archive: Path, workers: int | None = None) -> tuple[dict[str, Split], list[str]]:
    """Stream an image folder (dir or archive) and decode it in parallel."""
    source = str(archive)
    workers = workers or os.cpu_count() or 1
    names: list[str] = []
    chunks: list[Future] = []
    pending_names: list[str] = []
    pending_blobs: list[bytes] = []
    skipped = 0
    with ProcessPoolExecutor(max_workers=workers) as pool, \
            Progress(f"decode {archive.name}", unit="images") as bar:
        def submit() -> None:
            chunks.append(pool.submit(_decode_chunk, pending_names.copy(), pending_blobs.copy()))
            chunks[-1].add_done_callback(lambda f, n=len(pending_names): bar.update(n))
            pending_names.clear()
            pending_blobs.clear()

        for name, data in members(archive, source):
            parts = PurePosixPath(name).parts
            if not name.lower().endswith(IMAGE_SUFFIXES) or any(p.startswith((".", "__MACOSX")) for p in parts):
                skipped += 1
                continue
            names.append(name)
            pending_names.append(f"{source}:{name}")
            pending_blobs.append(data)
            if len(pending_names) >= CHUNK:
                submit()
        if pending_names:
            submit()
        if not names:
            raise FormatError(f"{source}: no .png/.jpg images found")
        keys, classes = _layout(names, source)
        arrays = [chunk.result() for chunk in chunks]
    if skipped:
        log.warning("%s: skipped %d file(s) that are not .png/.jpg images", source, skipped)
    if len({a.shape[1:3] for a in arrays}) > 1:
        first = arrays[0].shape
        bad = next(i for i, a in enumerate(arrays) if a.shape[1:3] != first[1:3])
        raise FormatError(f"{source}:{names[bad * CHUNK]}: image size {arrays[bad].shape[2]}x"
                          f"{arrays[bad].shape[1]} differs from {names[0]} ({first[2]}x{first[1]})")
    if len({a.shape[3] for a in arrays}) > 1:
        arrays = [np.repeat(a, 3, axis=3) if a.shape[3] == 1 else a for a in arrays]
    images = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    del arrays
    class_names = classes["train"]
    index = {c: i for i, c in enumerate(class_names)}
    splits = {}
    for split in classes:
        rows = sorted((i for i, key in enumerate(keys) if key[0] == split), key=lambda i: names[i])
        rows = np.asarray(rows, dtype=np.int64)
        labels = np.asarray([index[keys[i][1]] for i in rows], dtype=np.int64)
        splits[split] = Split(images[rows], labels)
    return splits, class_names


# --- pure split logic -------------------------------------------------------

def carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Move a seeded ``fraction`` of train into a validation split (orders kept)."""
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = int(round(len(train) * fraction))
    val_rows, train_rows = np.sort(order[:n_val]), np.sort(order[n_val:])
    return (Split(train.images[train_rows], train.labels[train_rows]),
            Split(train.images[val_rows], train.labels[val_rows]))


def cap(split: Split, max_samples: int | None, seed: int) -> Split:
    """A seeded random subset of at most ``max_samples`` (order kept)."""
    if max_samples is None or len(split) <= max_samples:
        return split
    rows = np.sort(np.random.default_rng(seed).permutation(len(split))[:max_samples])
    return Split(split.images[rows], split.labels[rows])


READERS = {"idx": read_idx, "cifar_pickle": read_cifar}


def prepare(dataset: str, raw: Path, params: params_mod.Params) -> DatasetFile:
    cfg = params_mod.dataset(params, dataset)
    try:
        manifest = json.loads((raw / MANIFEST).read_text())
    except FileNotFoundError:
        raise FormatError(f"{raw / MANIFEST}: not found; run download@{dataset} first") from None
    except json.JSONDecodeError as exc:
        raise FormatError(f"{raw / MANIFEST}: not valid JSON ({exc})") from None
    fmt, source = manifest.get("format"), manifest.get("source")
    log.info("prepare %s: reading %s (%s) from %s", dataset, source, fmt, raw)
    if fmt == "image_folder":
        splits, class_names = read_image_folder(raw / next(iter(manifest["files"])))
    elif fmt in READERS:
        splits, class_names = READERS[fmt](raw, source)
    else:
        raise FormatError(f"{raw / MANIFEST}: unknown format {fmt!r}")
    if "val" not in splits:
        splits["train"], splits["val"] = carve_validation(
            splits["train"], cfg.split.val_fraction, cfg.split.seed)
    limits = params.limits
    splits = {name: cap(split, limits.max_samples_of(name), cfg.split.seed + i)
              for i, (name, split) in enumerate(sorted(splits.items()))}
    limit = limits.max_samples
    if isinstance(limit, params_mod.SampleCaps):
        limit = limit.model_dump(exclude_none=True)
    meta = {
        "dataset": dataset, "source": source, "format": fmt,
        "val_fraction": cfg.split.val_fraction, "seed": cfg.split.seed, "max_samples": limit,
        "counts": {name: len(split) for name, split in splits.items()},
        "raw_sha256": manifest.get("files", {}),
    }
    return DatasetFile(splits, class_names, meta)


def main(argv=None) -> int:
    def configure(parser):
        parser.add_argument("dataset", help="a dataset named under 'datasets' in params.yaml")
        parser.add_argument("--raw", type=Path, help="raw folder (default: data/raw/<dataset>)")
        parser.add_argument("--out", type=Path, help="output file (default: data/prepared/<dataset>.npz)")

    def body(args):
        params = params_mod.load(args.params)
        raw = args.raw or Path("data/raw") / args.dataset
        out = args.out or Path("data/prepared") / f"{args.dataset}.npz"
        data = prepare(args.dataset, raw, params)
        save(out, data)
        histogram = np.bincount(data.splits["train"].labels, minlength=len(data.class_names))
        log.info("prepare %s: %s images %s, %d classes, train label histogram %s -> %s",
                 args.dataset, data.meta["counts"], data.image_shape, len(data.class_names),
                 histogram.tolist(), out)
        return [out]

    return cli.run("prepare", __doc__, body, configure, argv)


if __name__ == "__main__":
    raise SystemExit(main())
