"""DVC stage ``download@<dataset>``: fetch a dataset's raw files, verified.

Writes ``data/raw/<dataset>/``: the source files exactly as verified, plus
``manifest.json`` (source, format, sha256 of each file) for the prepare stage.
The folder is assembled under a temporary name and renamed into place only
when complete, so a failed run leaves nothing at the output path. Verified
files are also kept in a download cache (``download.cache_dir``) and never
fetched again while they still verify.

The mirror comes from ``DATA_MIRROR`` (or ``download.mirror``); with it set,
every file is read from ``<mirror>/<mirror_dir>/<file>`` instead of the
official host.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import urllib.parse
from pathlib import Path, PurePosixPath

from stages import atomic, cli, params as params_mod
from stages.archives import is_archive, members, verify_archive
from stages.fetch import (
    ChecksumError, FetchError, Transport, check_sha256, copy_verified, fetch, local_path, sha256_file,
)
from stages.sources import MANIFEST, SOURCES, location
from stages.urls import redact

log = logging.getLogger("stages.download")



def resolve_mirror(configured: str | None) -> str | None:
    """DATA_MIRROR wins over download.mirror; a local mirror must exist."""
    mirror = os.environ.get("DATA_MIRROR") or configured
    if not mirror:
        return None
    path = local_path(mirror)
    if path is not None and not path.is_dir():
        origin = "DATA_MIRROR" if os.environ.get("DATA_MIRROR") else "download.mirror"
        raise FetchError(f"{origin}={mirror}: mirror directory not found")
    return mirror


def _builtin(name: str, staging: Path, mirror: str | None, transport: Transport, cache: Path) -> dict:
    spec = SOURCES[name]
    files = {}
    for file in spec.files:
        try:
            where = location(spec, file, mirror)
        except LookupError as exc:
            raise FetchError(str(exc)) from None
        cached = cache / spec.name / file.name

        def verify(path: Path, file=file, where=where) -> None:
            check_sha256(path, file.sha256, redact(where), payload=file.payload)

        try:
            fetch(where, cached, verify, transport)
        except FetchError as exc:
            if mirror and name == "cifar10":
                raise FetchError(
                    f"{exc}. This mirror may hold only the JPEG copy of CIFAR-10: set "
                    "datasets.cifar10.source.builtin: cifar10_jpeg in params.yaml"
                ) from None
            raise
        copy_verified(cached, staging / file.name)
        files[file.name] = file.sha256
    checksum = "sha256 of decompressed payload" if spec.files[0].payload else "sha256 of file"
    return {"source": spec.name, "format": spec.format, "files": files, "checksum": checksum}


def snapshot_directory(folder: Path, target: Path) -> None:
    """Pack a local image folder into a deterministic .tar (sorted, fixed metadata)."""
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members(folder):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            archive.addfile(info, io.BytesIO(data))


def _image_folder(source, staging: Path, transport: Transport, cache: Path) -> dict:
    where = source.path
    path = local_path(where)
    if path is not None and not path.exists():
        raise FetchError(f"{redact(where)}: not found")
    if path is not None and path.is_dir():
        target = staging / "images.tar"
        snapshot_directory(path, target)
    else:
        name = PurePosixPath(urllib.parse.urlsplit(where).path).name if path is None else path.name
        if not is_archive(name):
            raise FetchError(
                f"{redact(where)}: an image folder source must be a directory or a "
                ".tar.gz/.tgz/.tar/.zip archive"
            )

        def verify(file: Path) -> None:
            check_sha256(file, source.sha256, redact(where))
            verify_archive(file, redact(where))

        target = staging / name
        if source.sha256 and path is None:  # remote and pinned: worth caching
            cached = cache / "image_folder" / source.sha256 / name
            fetch(where, cached, verify, transport)
            copy_verified(cached, target)
        else:
            fetch(where, target, verify, transport)
    digest = sha256_file(target)
    if path is not None and path.is_dir() and source.sha256 not in (None, digest):
        raise ChecksumError(
            f"{redact(where)}: checksum mismatch: expected sha256 {source.sha256} of the folder's "
            f"snapshot (images.tar), got {digest}"
        )
    if source.sha256 is None:
        log.warning(
            "%s: no sha256 pinned, so its content is not checked against one; "
            "pin it with sha256: %s", redact(where), digest,
        )
    return {"source": "image_folder", "format": "image_folder", "files": {target.name: digest},
            "checksum": "sha256 of file"}


def download(dataset: str, out: Path, params: params_mod.Params) -> dict:
    """Fetch ``dataset`` into ``out``; return the manifest written there."""
    source = params_mod.dataset(params, dataset).source
    settings = params.download
    transport = Transport(settings.retries, settings.timeout_s, settings.backoff_s)
    cache = Path(settings.cache_dir)
    mirror = resolve_mirror(settings.mirror) if source.builtin else None
    origin = redact(source.path) if source.path else redact(mirror) if mirror else "official host"
    log.info("download %s (source %s) from %s -> %s", dataset, source.name, origin, out)
    with atomic.replacing(out, directory=True) as staging:
        if source.builtin:
            manifest = _builtin(source.builtin, staging, mirror, transport, cache)
        else:
            manifest = _image_folder(source, staging, transport, cache)
        manifest["dataset"] = dataset
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log.info("download %s: %d file(s) verified in %s", dataset, len(manifest["files"]), out)
    return manifest


def main(argv=None) -> int:
    def configure(parser):
        parser.add_argument("dataset", help="a dataset named under 'datasets' in params.yaml")
        parser.add_argument("--out", type=Path, help="output folder (default: data/raw/<dataset>)")

    def body(args):
        params = params_mod.load(args.params)
        out = args.out or Path("data/raw") / args.dataset
        download(args.dataset, out, params)
        return [out]

    return cli.run("download", __doc__, body, configure, argv)


if __name__ == "__main__":
    raise SystemExit(main())
