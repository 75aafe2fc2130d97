"""stages/archives.py: safe, streaming reads of gzip payloads, tar/zip archives and folders.

Every hostile or broken input is built here, in memory or under tmp_path; the
bomb tests lower the module's own limit constants so they stay fast.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from builders import image_folder, tar_gz, zip_folder
from stages import archives
from stages.archives import ArchiveError, gunzip, is_archive, members, safe_name, verify_archive
from stages.errors import PipelineError


# --------------------------------------------------------------------------- helpers


def _info(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def write_tar(path: Path, entries, mode: str | None = None) -> Path:
    """entries: (TarInfo, bytes | None); mode from the suffix unless given."""
    mode = mode or ("w:gz" if path.name.endswith((".tar.gz", ".tgz")) else "w")
    with tarfile.open(path, mode) as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if data else None)
    return path


def regular(name: str) -> zipfile.ZipInfo:
    """A ZipInfo for a regular file with unix mode bits, as Info-ZIP writes them."""
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    info.create_system = 3
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def write_zip(path: Path, entries, compression=zipfile.ZIP_DEFLATED) -> Path:
    """entries: (name | ZipInfo, bytes); a plain name becomes a regular-file entry."""
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in entries:
            archive.writestr(regular(name) if isinstance(name, str) else name, data, compress_type=compression)
    return path


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def refused(path: Path, *fragments: str) -> str:
    """Read every member; expect an ArchiveError naming the archive and each fragment."""
    with pytest.raises(ArchiveError) as caught:
        list(members(path))
    message = str(caught.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "images"
    image_folder(root, classes=("cat", "dog"), per_class=2)
    return root


# --------------------------------------------------------------------------- reading good sources


def test_members_of_directory_sorted_and_complete(folder):
    read = list(members(folder))
    names = [name for name, _ in read]
    assert names == sorted(names)
    assert dict(read) == files_of(folder)
    assert len(read) == 2 * 2 * 2  # splits x classes x per_class


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".tar", ".zip"])
def test_members_of_archive_match_the_folder(folder, tmp_path, suffix):
    path = tmp_path / f"images{suffix}"
    if suffix == ".zip":
        zip_folder(folder, path)
    else:
        write_tar(path, [(_info(n, d), d) for n, d in sorted(files_of(folder).items())])
    assert dict(members(path)) == files_of(folder)
    assert verify_archive(path) == len(files_of(folder))


def test_members_skip_directory_entries_and_normalise_dot_prefix(tmp_path):
    path = write_tar(tmp_path / "dotted.tar.gz", [
        (_info(".", kind=tarfile.DIRTYPE), None),
        (_info("./train", kind=tarfile.DIRTYPE), None),
        (_info("./train/a.png", b"png"), b"png"),
    ])
    assert list(members(path)) == [("train/a.png", b"png")]


def test_members_of_zip_skip_directory_entries(tmp_path):
    path = tmp_path / "dirs.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("train/", b"")  # a directory entry (mode S_IFDIR)
        archive.writestr(regular("train/a.png"), b"png")
    assert list(members(path)) == [("train/a.png", b"png")]


def test_zip_without_unix_mode_bits_is_read(tmp_path):
    """Zips written on Windows/DOS carry no unix mode (external_attr high bits 0)."""
    info = zipfile.ZipInfo("a.png")
    info.create_system = 0
    info.external_attr = 0x20  # MS-DOS "archive" attribute only
    path = write_zip(tmp_path / "dos.zip", [(info, b"png")])
    assert list(members(path)) == [("a.png", b"png")]


def test_zip_written_by_zipfile_writestr_is_read(tmp_path):
    path = tmp_path / "py.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("train/cat/000.png", b"png")  # external_attr = 0o600 << 16
    assert list(members(path)) == [("train/cat/000.png", b"png")]


def test_archive_type_is_sniffed_from_content_not_suffix(folder, tmp_path):
    disguised = zip_folder(folder, tmp_path / "images.tar.gz")  # a zip under a tar name
    assert dict(members(disguised)) == files_of(folder)


def test_members_uses_the_given_source_name_in_errors(tmp_path):
    path = write_tar(tmp_path / "x.tar", [(_info("../x", b"1"), b"1")])
    with pytest.raises(ArchiveError, match="https://example.org/x.tar"):
        list(members(path, "https://example.org/x.tar"))


def test_members_refuses_a_non_archive(tmp_path):
    path = tmp_path / "images.rar"
    path.write_bytes(b"Rar!")
    with pytest.raises(ArchiveError, match=r"images\.rar: not a directory or a"):
        members(path)


@pytest.mark.parametrize("name,expected", [
    ("a.tar.gz", True), ("A.TGZ", True), ("x.tar", True), ("x.zip", True),
    ("x.gz", False), ("x.rar", False), ("folder", False),
])
def test_is_archive(name, expected):
    assert is_archive(name) is expected


def test_archive_error_is_a_pipeline_error():
    assert issubclass(ArchiveError, PipelineError)


# --------------------------------------------------------------------------- unsafe names


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar"])
@pytest.mark.parametrize("name", ["../evil.txt", "train/../../evil.txt"])
def test_tar_member_climbing_out_is_refused(tmp_path, suffix, name):
    path = write_tar(tmp_path / f"bad{suffix}", [
        (_info("ok.txt", b"fine"), b"fine"),
        (_info(name, b"evil"), b"evil"),
    ])
    refused(path, repr(name), "..")


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt"])
def test_zip_member_climbing_out_is_refused(tmp_path, name):
    path = write_zip(tmp_path / "bad.zip", [("ok.txt", b"fine"), (name, b"evil")])
    assert name in zipfile.ZipFile(path).namelist()  # the fixture really holds it
    refused(path, repr(name), "..")


def test_tar_absolute_member_is_refused(tmp_path):
    path = write_tar(tmp_path / "abs.tar.gz", [(_info("/etc/evil", b"x"), b"x")])
    refused(path, "'/etc/evil'", "absolute path")


def test_zip_absolute_member_is_refused(tmp_path):
    path = write_zip(tmp_path / "abs.zip", [("/etc/evil", b"x")])
    assert zipfile.ZipFile(path).namelist() == ["/etc/evil"]
    refused(path, "'/etc/evil'", "absolute path")


def test_zip_windows_drive_member_is_refused(tmp_path):
    path = write_zip(tmp_path / "drive.zip", [("C:/Windows/evil", b"x")])
    refused(path, "absolute path")


# --------------------------------------------------------------------------- links and special files


def test_tar_symlink_member_is_refused(tmp_path):
    path = write_tar(tmp_path / "link.tar.gz", [
        (_info("ok.txt", b"fine"), b"fine"),
        (_info("train/a.png", kind=tarfile.SYMTYPE, linkname="/etc/passwd"), None),
    ])
    refused(path, "'train/a.png'", "is a link; links are refused")


def test_tar_hard_link_member_is_refused(tmp_path):
    path = write_tar(tmp_path / "hard.tar", [
        (_info("ok.txt", b"fine"), b"fine"),
        (_info("copy.txt", kind=tarfile.LNKTYPE, linkname="ok.txt"), None),
    ])
    refused(path, "'copy.txt'", "is a link; links are refused")


def test_zip_symlink_member_is_refused(tmp_path):
    link = zipfile.ZipInfo("train/a.png")
    link.create_system = 3  # unix
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    path = write_zip(tmp_path / "link.zip", [("ok.txt", b"fine"), (link, b"/etc/passwd")])
    refused(path, "'train/a.png'", "is a link; links are refused")


def test_zip_unix_regular_file_modes_are_accepted(tmp_path):
    info = zipfile.ZipInfo("a.txt")
    info.create_system = 3
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    path = write_zip(tmp_path / "ok.zip", [(info, b"fine")])
    assert list(members(path)) == [("a.txt", b"fine")]


@pytest.mark.parametrize("kind", [tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE])
def test_tar_device_or_fifo_member_is_refused(tmp_path, kind):
    path = write_tar(tmp_path / "dev.tar.gz", [(_info("dev/thing", kind=kind, devmajor=1, devminor=3), None)])
    refused(path, "'dev/thing'", "device or FIFO")


def test_symlinked_file_in_directory_is_refused(folder, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    os.symlink(outside, folder / "train" / "cat" / "zz_link.png")
    message = refused(folder, "zz_link.png", "symbolic link")
    assert "secret" not in message.replace(str(tmp_path), "")


def test_symlinked_subfolder_in_directory_is_refused(folder, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.png").write_bytes(b"x")
    os.symlink(elsewhere, folder / "train" / "owl", target_is_directory=True)
    refused(folder, "'owl'", "symbolic link")


def test_dangling_symlink_in_directory_is_refused(folder, tmp_path):
    os.symlink(tmp_path / "nowhere", folder / "test" / "gone.png")
    refused(folder, "gone.png", "symbolic link")


def test_fifo_in_directory_is_refused(folder):
    os.mkfifo(folder / "test" / "pipe")
    refused(folder, "'test/pipe'", "not a regular file")


# --------------------------------------------------------------------------- decompression bombs


def _gzip_zeros(path: Path, size: int) -> Path:
    path.write_bytes(gzip.compress(bytes(size), compresslevel=9))
    return path


def test_gzip_bomb_over_the_ratio_floor_is_refused(tmp_path, monkeypatch):
    path = _gzip_zeros(tmp_path / "zeros.gz", 8 * 2**20)  # ~8 KiB compressed, ~1000x
    payload, _ = gunzip(path)  # the real limits let an 8 MiB payload through...
    assert len(payload) == 8 * 2**20
    monkeypatch.setattr(archives, "RATIO_FLOOR", 2**20)  # ...a lower floor does not
    with pytest.raises(ArchiveError, match=r"expands more than 100x its compressed size") as caught:
        gunzip(path)
    assert str(path) in str(caught.value)


def test_gzip_payload_over_the_total_limit_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "random.gz"
    path.write_bytes(gzip.compress(os.urandom(3 * 2**20)))  # incompressible: no ratio trip
    monkeypatch.setattr(archives, "MAX_TOTAL_BYTES", 2**20)
    with pytest.raises(ArchiveError, match=r"expands past 1,048,576 bytes"):
        gunzip(path, "mirror/random.gz")


def test_gzip_below_the_ratio_floor_is_accepted(tmp_path, monkeypatch):
    path = _gzip_zeros(tmp_path / "zeros.gz", 2**19)
    monkeypatch.setattr(archives, "RATIO_FLOOR", 2**20)
    payload, digest = gunzip(path)
    assert payload == bytes(2**19) and digest == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_archive_bomb_over_the_ratio_floor_is_refused(tmp_path, monkeypatch, suffix):
    zeros = bytes(8 * 2**20)
    path = tmp_path / f"bomb{suffix}"
    if suffix == ".zip":
        write_zip(path, [("zeros.bin", zeros)])
    else:
        write_tar(path, [(_info("zeros.bin", zeros), zeros)])
    assert path.stat().st_size < 100_000
    assert verify_archive(path) == 1  # fine under the real floor
    monkeypatch.setattr(archives, "RATIO_FLOOR", 2**20)
    refused(path, "expands more than 100x", "decompression bomb")


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_archive_member_over_the_member_limit_is_refused(tmp_path, monkeypatch, suffix):
    data = os.urandom(4096)
    path = tmp_path / f"big{suffix}"
    if suffix == ".zip":
        write_zip(path, [("small.bin", b"s"), ("big.bin", data)])
    else:
        write_tar(path, [(_info("small.bin", b"s"), b"s"), (_info("big.bin", data), data)])
    monkeypatch.setattr(archives, "MAX_MEMBER_BYTES", 1000)
    refused(path, "'big.bin' declares 4,096 bytes", "over the 1,000-byte limit")


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_archive_total_over_the_limit_is_refused(tmp_path, monkeypatch, suffix):
    entries = [(f"part{i}.bin", os.urandom(1000)) for i in range(5)]
    path = tmp_path / f"many{suffix}"
    if suffix == ".zip":
        write_zip(path, entries)
    else:
        write_tar(path, [(_info(n, d), d) for n, d in entries])
    monkeypatch.setattr(archives, "MAX_TOTAL_BYTES", 3500)
    refused(path, "expands past 3,500 bytes")


def test_archive_with_too_many_members_is_refused(tmp_path, monkeypatch):
    path = write_tar(tmp_path / "many.tar", [(_info(f"{i}.txt", b"x"), b"x") for i in range(4)])
    monkeypatch.setattr(archives, "MAX_MEMBERS", 3)
    refused(path, "more than 3 members")


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_tar_member_declaring_a_huge_size_is_refused(tmp_path, suffix):
    """A 5 GiB header with no data behind it: refused from the header, nothing is read."""
    header = _info("huge.bin")
    header.size = 5 * 2**30
    raw = header.tobuf(tarfile.GNU_FORMAT) + bytes(512 + 1024)
    path = tmp_path / f"huge{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix == ".tar.gz" else raw)
    refused(path, "'huge.bin' declares 5,368,709,120 bytes", "decompression bomb")


def test_directory_file_over_the_member_limit_is_refused(folder, monkeypatch):
    (folder / "train" / "big.bin").write_bytes(bytes(5000))
    monkeypatch.setattr(archives, "MAX_MEMBER_BYTES", 4096)
    refused(folder, "'train/big.bin' declares 5,000 bytes")


# --------------------------------------------------------------------------- truncated or corrupt


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_truncated_tar_gz_is_refused(folder, tmp_path):
    path = tar_gz(folder, tmp_path / "images.tar.gz")
    assert verify_archive(path) == 8
    refused(_truncate(path), "truncated or corrupt")


def test_truncated_tar_mid_member_is_refused(tmp_path):
    data = os.urandom(3000)
    path = write_tar(tmp_path / "cut.tar", [(_info("a.bin", data), data)])
    path.write_bytes(path.read_bytes()[:1500])
    refused(path, "truncated or corrupt")


def test_plain_tar_cut_at_a_member_boundary_is_refused(tmp_path):
    entries = [(_info(n, b"x" * 700), b"x" * 700) for n in ("a.txt", "b.txt")]
    path = write_tar(tmp_path / "cut.tar", entries)
    path.write_bytes(path.read_bytes()[: 512 + 1024])  # a.txt's header and data only
    refused(path, "truncated or corrupt")


def test_truncated_zip_is_refused(folder, tmp_path):
    path = zip_folder(folder, tmp_path / "images.zip")
    assert verify_archive(path) == 8
    refused(_truncate(path), "truncated or corrupt")


def test_corrupt_zip_member_data_is_refused(tmp_path):
    data = os.urandom(4000)
    path = write_zip(tmp_path / "flip.zip", [("a.bin", data)], compression=zipfile.ZIP_STORED)
    raw = bytearray(path.read_bytes())
    at = raw.index(data[:32]) + 100
    raw[at] ^= 0xFF  # same size, wrong CRC
    path.write_bytes(bytes(raw))
    refused(path, "truncated or corrupt")


def test_garbage_named_tar_gz_is_refused(tmp_path):
    path = tmp_path / "junk.tar.gz"
    path.write_bytes(b"this is not a tarball at all" * 40)
    refused(path, "not a directory or a .tar.gz/.tgz/.tar/.zip archive")


def test_missing_archive_is_refused(tmp_path):
    with pytest.raises(ArchiveError, match=r"gone\.zip: cannot read archive"):
        members(tmp_path / "gone.zip")


# --------------------------------------------------------------------------- gunzip


def test_gunzip_returns_payload_and_its_sha256(tmp_path):
    payload = os.urandom(5000) + bytes(5000)
    path = tmp_path / "f.gz"
    path.write_bytes(gzip.compress(payload))
    data, digest = gunzip(path)
    assert data == payload
    assert digest == hashlib.sha256(payload).hexdigest()


def test_gunzip_digest_ignores_compression_level_and_mtime(tmp_path):
    payload = bytes(range(256)) * 200
    a, b = tmp_path / "a.gz", tmp_path / "b.gz"
    a.write_bytes(gzip.compress(payload, compresslevel=1, mtime=0))
    b.write_bytes(gzip.compress(payload, compresslevel=9, mtime=123456))
    assert a.read_bytes() != b.read_bytes()
    assert gunzip(a)[1] == gunzip(b)[1] == hashlib.sha256(payload).hexdigest()


def test_gunzip_refuses_a_truncated_file(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(os.urandom(20000)))
    _truncate(path, 0.6)
    with pytest.raises(ArchiveError, match="truncated or corrupt gzip file") as caught:
        gunzip(path)
    assert str(path) in str(caught.value)


def test_gunzip_refuses_a_file_that_is_not_gzip(tmp_path):
    path = tmp_path / "plain.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ArchiveError, match=r"http://mirror/plain\.gz: truncated or corrupt gzip"):
        gunzip(path, "http://mirror/plain.gz")


# --------------------------------------------------------------------------- safe_name


@pytest.mark.parametrize("name,expected", [
    ("a.png", "a.png"),
    ("train/cat/001.png", "train/cat/001.png"),
    ("./train/cat/001.png", "train/cat/001.png"),
    ("train//cat/./001.png", "train/cat/001.png"),
    ("train/cat/", "train/cat"),
    ("train\\cat\\001.png", "train/cat/001.png"),
    ("..hidden/x..png", "..hidden/x..png"),  # dots inside a name are not '..'
])
def test_safe_name_accepts_and_normalises(name, expected):
    assert safe_name(name, "src.tar") == expected


@pytest.mark.parametrize("name", [
    "../x.png", "a/../../x.png", "a/..", "..", "..\\x.png", "a\\..\\..\\x.png",
])
def test_safe_name_refuses_climbing_out(name):
    with pytest.raises(ArchiveError, match=r"src\.tar: member .* escapes the archive folder"):
        safe_name(name, "src.tar")


@pytest.mark.parametrize("name", ["/etc/passwd", "//server/share/x", "C:/x.png", "C:\\x.png", "c:x.png"])
def test_safe_name_refuses_absolute_paths(name):
    with pytest.raises(ArchiveError, match=r"src\.tar: member .* has an absolute path"):
        safe_name(name, "src.tar")
