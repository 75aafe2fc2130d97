"""Safe reading of gzip payloads, tar/zip archives and image directories.

Nothing here extracts to disk: members are streamed as bytes, so a hostile
archive cannot write outside the project. Every member is still checked, so
a bad archive is refused loudly rather than half-read:

* names that are absolute or climb out with ``..`` are refused;
* symbolic links, hard links and device/FIFO members are refused;
* decompression bombs are refused: a member or a payload larger than the
  limits below, or a total that expands more than ``MAX_RATIO`` times the
  compressed size once past ``RATIO_FLOOR`` bytes;
* truncated or corrupt archives raise :class:`ArchiveError` naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from stages.errors import PipelineError

MAX_MEMBER_BYTES = 256 * 2**20  # one image file
MAX_TOTAL_BYTES = 8 * 2**30  # everything an archive or a gzip payload expands to
MAX_MEMBERS = 5_000_000
MAX_RATIO = 100  # expansion over the compressed size...
RATIO_FLOOR = 64 * 2**20  # ...checked once this much has been expanded
CHUNK = 1 << 20

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


class ArchiveError(PipelineError):
    """An archive or compressed file is corrupt, truncated or unsafe."""

    next_step = ("fetch the file again (dvc repro -f download@<dataset>); if it comes from your own source, "
                 "repack it as a plain .tar.gz, .tar or .zip of regular files")


def is_archive(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


class _Budget:
    """Counts expanded bytes and refuses decompression bombs."""

    def __init__(self, source: str, compressed_size: int):
        self.source = source
        self.compressed_size = max(compressed_size, 1)
        self.total = 0
        self.members = 0

    def member(self, name: str, size: int) -> None:
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise ArchiveError(f"{self.source}: more than {MAX_MEMBERS:,} members; refusing (archive bomb?)")
        if size > MAX_MEMBER_BYTES:
            raise ArchiveError(
                f"{self.source}: member {name!r} declares {size:,} bytes, over the "
                f"{MAX_MEMBER_BYTES:,}-byte limit; refusing (decompression bomb?)"
            )
        self.add(size)

    def add(self, size: int) -> None:
        self.total += size
        if self.total > MAX_TOTAL_BYTES:
            raise ArchiveError(
                f"{self.source}: expands past {MAX_TOTAL_BYTES:,} bytes; refusing (decompression bomb?)"
            )
        if self.total > RATIO_FLOOR and self.total > MAX_RATIO * self.compressed_size:
            raise ArchiveError(
                f"{self.source}: expands more than {MAX_RATIO}x its compressed size "
                f"({self.compressed_size:,} -> {self.total:,}+ bytes); refusing (decompression bomb?)"
            )


def safe_name(name: str, source: str) -> str:
    """A member name as a clean relative POSIX path, or an ArchiveError."""
    if "\\" in name:
        name = name.replace("\\", "/")
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and re.match(r"^[A-Za-z]:", path.parts[0])):
        raise ArchiveError(
            f"{source}: member {name!r} has an absolute path or drive letter; refusing to read the archive"
        )
    if ".." in path.parts:
        raise ArchiveError(f"{source}: member {name!r} escapes the archive folder ('..'); refusing")
    return str(path)


def gunzip(path: Path, source: str | None = None) -> tuple[bytes, str]:
    """Decompress a .gz file with bomb limits; return (payload, sha256 of payload)."""
    source = source or str(path)
    budget = _Budget(source, path.stat().st_size)
    digest = hashlib.sha256()
    parts = []
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(CHUNK):
                budget.add(len(chunk))
                digest.update(chunk)
                parts.append(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise ArchiveError(f"{source}: truncated or corrupt gzip file ({exc})") from None
    return b"".join(parts), digest.hexdigest()


def _tar_members(path: Path, source: str) -> Iterator[tuple[str, bytes]]:
    budget = _Budget(source, path.stat().st_size)
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                name = safe_name(member.name, source)
                if member.issym() or member.islnk():
                    raise ArchiveError(f"{source}: member {name!r} is a link; links are refused")
                if member.isdir():
                    continue
                if not member.isfile():
                    raise ArchiveError(f"{source}: member {name!r} is a device or FIFO; refused")
                budget.member(name, member.size)
                handle = archive.extractfile(member)
                data = handle.read() if handle else b""
                if len(data) != member.size:
                    raise ArchiveError(f"{source}: member {name!r} is truncated")
                yield name, data
            # tarfile stops quietly at a true end of file as well as at the zero
            # end-of-archive block; only the latter means the archive is whole.
            if archive.fileobj.tell() < archive.offset + tarfile.BLOCKSIZE:
                raise ArchiveError(f"{source}: truncated or corrupt archive (no end-of-archive marker)")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        raise ArchiveError(f"{source}: truncated or corrupt archive ({exc})") from None


def _zip_members(path: Path, source: str) -> Iterator[tuple[str, bytes]]:
    budget = _Budget(source, path.stat().st_size)
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = safe_name(info.filename, source)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise ArchiveError(f"{source}: member {name!r} is a link; links are refused")
                if info.is_dir():
                    continue
                if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                    raise ArchiveError(f"{source}: member {name!r} is a device or FIFO; refused")
                budget.member(name, info.file_size)
                with archive.open(info) as handle:
                    data = handle.read(MAX_MEMBER_BYTES + 1)
                if len(data) != info.file_size:
                    raise ArchiveError(f"{source}: member {name!r} does not match its declared size")
                yield name, data
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise ArchiveError(f"{source}: truncated or corrupt zip archive ({exc})") from None


def _dir_members(root: Path, source: str) -> Iterator[tuple[str, bytes]]:
    budget = _Budget(source, 1 << 62)  # plain files: no ratio to check
    for folder, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            full = Path(folder, filename)
            name = full.relative_to(root).as_posix()
            if full.is_symlink():
                raise ArchiveError(f"{source}: {name!r} is a symbolic link; links are refused")
            if not full.is_file():
                raise ArchiveError(f"{source}: {name!r} is not a regular file; refused")
            budget.member(name, full.stat().st_size)
            yield name, full.read_bytes()
        for dirname in dirnames:
            if Path(folder, dirname).is_symlink():
                raise ArchiveError(f"{source}: {dirname!r} is a symbolic link; links are refused")


def members(path: str | os.PathLike, source: str | None = None) -> Iterator[tuple[str, bytes]]:
    """Stream (relative name, bytes) for every file of a directory or archive."""
    path = Path(path)
    source = source or str(path)
    if path.is_dir():
        return _dir_members(path, source)
    try:
        with open(path, "rb") as handle:
            head = handle.read(262)
    except OSError as exc:
        raise ArchiveError(f"{source}: cannot read archive ({exc.strerror})") from None
    if head.startswith(b"PK"):
        return _zip_members(path, source)
    if head.startswith(b"\x1f\x8b") or head[257:262] == b"ustar" or str(source).lower().endswith(".tar"):
        return _tar_members(path, source)
    raise ArchiveError(f"{source}: not a directory or a {'/'.join(ARCHIVE_SUFFIXES)} archive")


def verify_archive(path: Path, source: str | None = None) -> int:
    """Read every member once (truncation, links, bombs); return the member count."""
    return sum(1 for _ in members(path, source))
