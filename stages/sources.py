"""The dataset registry: what each built-in source is, where it lives, its checksums.

A mirror is a directory or URL laid out ``<mirror>/<mirror_dir>/<file>``; it
replaces the official host for every file. The gzip'd IDX files pin the sha256
of their **decompressed payload** (so a recompressed mirror copy verifies);
archives pin the sha256 of the file itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Format = Literal["idx", "cifar_pickle", "image_folder"]

# written by the download stage beside the files it fetched: the source, its format and files
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class RemoteFile:
    name: str
    sha256: str
    payload: bool = False  # True: sha256 is of the gunzipped payload, not the file


@dataclass(frozen=True)
class SourceSpec:
    name: str
    format: Format
    official_url: str | None  # base URL of the official host; None where there is none
    mirror_dir: str
    files: tuple[RemoteFile, ...]
    class_names: tuple[str, ...] = ()
    image_side: int | None = None  # every image is side x side pixels; None: not known before prepare


def _idx_files(sha: dict[str, str]) -> tuple[RemoteFile, ...]:
    return tuple(RemoteFile(f"{stem}.gz", digest, payload=True) for stem, digest in sha.items())


FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

SOURCES: dict[str, SourceSpec] = {
    "mnist": SourceSpec(
        name="mnist",
        format="idx",
        official_url="https://storage.googleapis.com/cvdf-datasets/mnist/",
        mirror_dir="mnist",
        files=_idx_files({
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        }),
        class_names=tuple(str(d) for d in range(10)),
        image_side=28,
    ),
    "fashion_mnist": SourceSpec(
        name="fashion_mnist",
        format="idx",
        official_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        mirror_dir="fashion-mnist",
        files=_idx_files({
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        }),
        class_names=FASHION_CLASSES,
        image_side=28,
    ),
    "cifar10": SourceSpec(
        name="cifar10",
        format="cifar_pickle",
        official_url="https://www.cs.toronto.edu/~kriz/",
        mirror_dir="cifar10",
        files=(RemoteFile(
            "cifar-10-python.tar.gz",
            "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        ),),
        class_names=CIFAR10_CLASSES,
        image_side=32,
    ),
    # The public JPEG copy of CIFAR-10 (quality 75) as an image folder. It has no
    # official host: it is reached through a mirror.
    "cifar10_jpeg": SourceSpec(
        name="cifar10_jpeg",
        format="image_folder",
        official_url=None,
        mirror_dir="cifar10-jpeg",
        files=(RemoteFile(
            "cifar10-jpeg.tar.gz",
            "7854ea059adc7729ab5267c5269ccc01e6eaeea6549d5f3c834c106bae86e8ee",
        ),),
        image_side=32,
    ),
}

# IDX file stems for each split, as (images, labels).
IDX_SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def location(spec: SourceSpec, file: RemoteFile, mirror: str | None) -> str:
    """Where to fetch ``file`` from: the mirror when one is set, else the official host."""
    if mirror:
        return f"{mirror.rstrip('/')}/{spec.mirror_dir}/{file.name}"
    if spec.official_url is None:
        raise LookupError(
            f"source '{spec.name}' has no official host; set DATA_MIRROR (or download.mirror) "
            f"to a mirror holding {spec.mirror_dir}/{file.name}"
        )
    return spec.official_url + file.name
