"""The download stage end to end: ``stages.download.main([...])`` against tiny fixtures.

Sources are local mirror folders, file:// URLs and a real HTTP server on
127.0.0.1 (conftest.server). The registry's pinned checksums are pointed at the
fixtures with builders.pin_source. After every failure the stage must leave no
output folder, no temporary file, and nothing unverified in its cache.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import socket
import tarfile
from pathlib import Path

import pytest

from builders import image_folder, pin_source, sha256, tar_gz, write_idx_mirror, zip_folder
from conftest import params_for
from stages import download, params as params_mod
from stages.fetch import ChecksumError, check_sha256, sha256_file
from stages.sources import SOURCES

MNIST_FILES = [f.name for f in SOURCES["mnist"].files]
MNIST = {"mnist": {"source": {"builtin": "mnist"}}}
OUT = Path("data/raw/mnist")
CACHE = Path("data/cache")


# --------------------------------------------------------------------------- helpers


def run(caplog, *argv: str) -> tuple[int, str]:
    """Run the stage's entry point; return (exit code, the ERROR messages logged)."""
    caplog.clear()
    code = download.main(list(argv))
    errors = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    return code, errors


def fast(settings: dict) -> dict:
    """The download section: conftest's fast test settings with ``settings`` on top."""
    return {**params_for({})["download"], **settings}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_credentials(url: str) -> str:
    return url.replace("http://", "http://user:secret@", 1)


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".partial" in p.name or ".tmp" in p.name]


def assert_cache_verified(root: Path) -> None:
    """Every file in the cache verifies against what it is cached as."""
    cache = root / CACHE
    for path in (p for p in cache.rglob("*") if p.is_file()) if cache.exists() else ():
        rel = path.relative_to(cache).parts
        if rel[0] == "image_folder":
            assert sha256_file(path) == rel[1], f"unverified file in cache: {path}"
        else:
            pinned = {f.name: f for f in SOURCES[rel[0]].files}[rel[1]]
            check_sha256(path, pinned.sha256, str(path), payload=pinned.payload)


def assert_failed_cleanly(root: Path, out: Path = OUT) -> None:
    assert not (root / out).exists(), f"{out} exists after a failure"
    assert leftovers(root) == []
    assert_cache_verified(root)


def cached_files(root: Path) -> list[str]:
    cache = root / CACHE
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def assert_mnist_out(root: Path, mirror_folder: Path, checksums: dict) -> None:
    out = root / OUT
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == {"dataset": "mnist", "source": "mnist", "format": "idx", "files": checksums,
                        "checksum": "sha256 of decompressed payload"}
    assert sorted(p.name for p in out.iterdir()) == sorted(MNIST_FILES + ["manifest.json"])
    for name in MNIST_FILES:
        assert (out / name).read_bytes() == (mirror_folder / name).read_bytes(), name
    assert leftovers(root) == []
    assert cached_files(root) == sorted(f"mnist/{n}" for n in MNIST_FILES)
    assert_cache_verified(root)


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.DEBUG)


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A local mirror folder holding mnist/*.gz, with the registry pinned to it."""
    root = tmp_path / "mirror"
    fixture = write_idx_mirror(root)
    pin_source(monkeypatch, "mnist", fixture["checksums"])
    fixture["root"] = root
    return fixture


@pytest.fixture
def served(http_root, server, monkeypatch):
    """mnist/*.gz served over HTTP by the conftest server, registry pinned to it."""
    fixture = write_idx_mirror(http_root)
    pin_source(monkeypatch, "mnist", fixture["checksums"])
    fixture["root"] = http_root
    return fixture


# --------------------------------------------------------------------------- mnist from mirrors


def test_mnist_from_data_mirror_env(project, mirror, monkeypatch, caplog):
    project.write(params_for(MNIST))
    monkeypatch.setenv("DATA_MIRROR", str(mirror["root"]))
    assert run(caplog, "mnist") == (0, "")
    assert_mnist_out(project, mirror["root"] / "mnist", mirror["checksums"])


def test_mnist_from_download_mirror_param(project, mirror, caplog):
    project.write(params_for(MNIST, download=fast({"mirror": str(mirror["root"]), "cache_dir": "data/cache"})))
    assert run(caplog, "mnist") == (0, "")
    assert_mnist_out(project, mirror["root"] / "mnist", mirror["checksums"])


def test_data_mirror_env_wins_over_download_mirror(project, mirror, tmp_path, monkeypatch, caplog):
    project.write(params_for(MNIST, download=fast({"mirror": str(tmp_path / "no-such-mirror")})))
    monkeypatch.setenv("DATA_MIRROR", str(mirror["root"]))
    assert run(caplog, "mnist") == (0, "")
    assert_mnist_out(project, mirror["root"] / "mnist", mirror["checksums"])


def test_download_function_returns_the_manifest_and_honours_out(project, mirror, monkeypatch):
    monkeypatch.setenv("DATA_MIRROR", str(mirror["root"]))
    params = params_mod.parse(params_for(MNIST))
    manifest = download.download("mnist", Path("elsewhere/mnist"), params)
    assert manifest == json.loads(Path("elsewhere/mnist/manifest.json").read_text())
    assert manifest["files"] == mirror["checksums"]
    assert not OUT.exists()


def test_cli_out_option(project, mirror, monkeypatch, caplog):
    project.write(params_for(MNIST))
    monkeypatch.setenv("DATA_MIRROR", str(mirror["root"]))
    assert run(caplog, "mnist", "--out", "custom/place") == (0, "")
    assert json.loads(Path("custom/place/manifest.json").read_text())["files"] == mirror["checksums"]


def test_recompressed_mirror_copies_still_verify(project, mirror, monkeypatch, caplog):
    """Pinning the payload hash lets a mirror recompress the .gz files."""
    folder = mirror["root"] / "mnist"
    for name in MNIST_FILES:
        original = (folder / name).read_bytes()
        recompressed = gzip.compress(gzip.decompress(original), compresslevel=1, mtime=987654321)
        assert recompressed != original
        (folder / name).write_bytes(recompressed)
    project.write(params_for(MNIST))
    monkeypatch.setenv("DATA_MIRROR", str(folder.parent))
    assert run(caplog, "mnist") == (0, "")
    assert_mnist_out(project, folder, mirror["checksums"])  # byte-identical to the recompressed copies


def test_mnist_over_http(project, served, server, caplog):
    project.write(params_for(MNIST, download=fast({"mirror": server.url, "retries": 2, "backoff_s": 0.01})))
    assert run(caplog, "mnist") == (0, "")
    assert_mnist_out(project, served["root"] / "mnist", served["checksums"])
    assert server.hits == {f"/mnist/{n}": 1 for n in MNIST_FILES}


def test_mnist_over_http_mirror_with_trailing_slash(project, served, server, monkeypatch, caplog):
    project.write(params_for(MNIST))
    monkeypatch.setenv("DATA_MIRROR", server.url + "/")
    assert run(caplog, "mnist") == (0, "")
    assert server.hits == {f"/mnist/{n}": 1 for n in MNIST_FILES}


def test_mnist_from_file_url_mirror(project, mirror, monkeypatch, caplog):
    project.write(params_for(MNIST))
    monkeypatch.setenv("DATA_MIRROR", mirror["root"].as_uri())
    assert run(caplog, "mnist") == (0, "")
    assert_mnist_out(project, mirror["root"] / "mnist", mirror["checksums"])


def test_mnist_from_the_official_host(project, http_root, server, monkeypatch, caplog):
    fixture = write_idx_mirror(http_root)
    pin_source(monkeypatch, "mnist", fixture["checksums"], official_url=server.url + "/mnist/")
    project.write(params_for(MNIST))
    assert run(caplog, "mnist") == (0, "")
    assert_mnist_out(project, http_root / "mnist", fixture["checksums"])
    assert server.hits == {f"/mnist/{n}": 1 for n in MNIST_FILES}
    assert "official host" in caplog.text


# --------------------------------------------------------------------------- retries and network failures


def test_retries_recover_from_transient_errors(project, served, server, caplog):
    path = f"/mnist/{MNIST_FILES[1]}"
    server.fail_next(path, 2)
    project.write(params_for(MNIST, download=fast({"mirror": server.url, "retries": 2, "backoff_s": 0.01})))
    assert run(caplog, "mnist") == (0, "")
    assert server.hits[path] == 3
    assert sum(server.hits.values()) == 3 + 3
    assert "HTTP 503" in caplog.text and "retrying" in caplog.text
    assert_mnist_out(project, served["root"] / "mnist", served["checksums"])


def test_retries_exhausted_fail_cleanly(project, served, server, caplog):
    path = f"/mnist/{MNIST_FILES[1]}"
    server.fail_next(path, 3)
    project.write(params_for(MNIST, download=fast({"mirror": server.url, "retries": 2, "backoff_s": 0.01})))
    code, error = run(caplog, "mnist")
    assert code == 1
    assert server.hits[path] == 3
    assert f"{server.url}{path}" in error
    assert "unreachable after 3 attempts" in error
    assert "DATA_MIRROR" in error
    assert_failed_cleanly(project)
    assert cached_files(project) == [f"mnist/{MNIST_FILES[0]}"]  # the verified first file stays


def test_zero_retries_means_one_attempt(project, served, server, caplog):
    path = f"/mnist/{MNIST_FILES[0]}"
    server.fail_next(path, 1)
    project.write(params_for(MNIST, download=fast({"mirror": server.url, "retries": 0})))
    code, error = run(caplog, "mnist")
    assert code == 1 and "unreachable after 1 attempts" in error
    assert server.hits[path] == 1
    assert_failed_cleanly(project)


def test_unreachable_host(project, mirror, caplog):
    url = f"http://127.0.0.1:{closed_port()}"
    project.write(params_for(MNIST, download=fast({"mirror": url, "retries": 1, "backoff_s": 0.01})))
    code, error = run(caplog, "mnist")
    assert code == 1
    assert f"{url}/mnist/{MNIST_FILES[0]}" in error
    assert "unreachable" in error and "DATA_MIRROR" in error
    assert_failed_cleanly(project)


def test_http_404_names_the_url_and_is_not_retried(project, served, server, caplog):
    missing = MNIST_FILES[2]
    (served["root"] / "mnist" / missing).unlink()
    project.write(params_for(MNIST, download=fast({"mirror": server.url, "retries": 3, "backoff_s": 0.01})))
    code, error = run(caplog, "mnist")
    assert code == 1
    assert f"{server.url}/mnist/{missing}: not found (HTTP 404)" in error
    assert server.hits[f"/mnist/{missing}"] == 1
    assert_failed_cleanly(project)


def test_file_missing_from_local_mirror(project, mirror, monkeypatch, caplog):
    missing = mirror["root"] / "mnist" / MNIST_FILES[3]
    missing.unlink()
    project.write(params_for(MNIST))
    monkeypatch.setenv("DATA_MIRROR", str(mirror["root"]))
    code, error = run(caplog, "mnist")
    assert code == 1
    assert f"{missing}: not found" in error
    assert_failed_cleanly(project)


def test_missing_mirror_folder_from_env(project, mirror, tmp_path, monkeypatch, caplog):
    gone = tmp_path / "unplugged-drive" / "mirror"
    project.write(params_for(MNIST))
    monkeypatch.setenv("DATA_MIRROR", str(gone))
    code, error = run(caplog, "mnist")
    assert code == 1
    assert f"DATA_MIRROR={gone}" in error and "not found" in error
    assert_failed_cleanly(project)


def test_missing_mirror_folder_from_params(project, mirror, tmp_path, caplog):
    gone = tmp_path / "nowhere"
    project.write(params_for(MNIST, download=fast({"mirror": gone.as_uri()})))
    code, error = run(caplog, "mnist")
    assert code == 1
    assert f"download.mirror={gone.as_uri()}" in error and "not found" in error
    assert_failed_cleanly(project)


def test_unsupported_mirror_scheme(project, mirror, caplog):
    project.write(params_for(MNIST, download=fast({"mirror": "ftp://mirror.example.org/data"})))
    code, error = run(caplog, "mnist")
    assert code == 1
    assert "unsupported URL scheme 'ftp'" in error
    assert "ftp://mirror.example.org/data" in error
    assert_failed_cleanly(project)


def test_unsupported_image_folder_scheme(project, caplog):
    project.write(params_for({"imgs": {"source": {"path": "ftp://example.org/images.zip"}}}))
    code, error = run(caplog, "imgs")
    assert code == 1
    assert "unsupported URL scheme 'ftp'" in error
    assert_failed_cleanly(project, Path("data/raw/imgs"))


# --------------------------------------------------------------------------- checksums and corrupt files


@pytest.mark.parametrize("over", ["folder", "http"])
def test_checksum_mismatch(project, tmp_path, http_root, request, monkeypatch, caplog, over):
    real = write_idx_mirror(http_root if over == "http" else tmp_path / "mirror", seed=0)
    pinned = write_idx_mirror(tmp_path / "other", seed=1)["checksums"]
    pin_source(monkeypatch, "mnist", pinned)
    base = request.getfixturevalue("server").url if over == "http" else str(tmp_path / "mirror")
    project.write(params_for(MNIST, download=fast({"mirror": base})))
    code, error = run(caplog, "mnist")
    name = MNIST_FILES[0]
    assert code == 1
    assert f"{base}/mnist/{name}" in error
    assert "checksum mismatch" in error
    assert f"expected sha256 of decompressed payload {pinned[name]}" in error
    assert f"got {real['checksums'][name]}" in error
    assert pinned[name] != real["checksums"][name]
    assert_failed_cleanly(project)
    assert cached_files(project) == []


def test_checksum_mismatch_raises_checksum_error(project, mirror, tmp_path, monkeypatch):
    pin_source(monkeypatch, "mnist", write_idx_mirror(tmp_path / "other", seed=1)["checksums"])
    monkeypatch.setenv("DATA_MIRROR", str(mirror["root"]))
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        download.download("mnist", OUT, params_mod.parse(params_for(MNIST)))
    assert_failed_cleanly(project)


def test_truncated_gz_in_mirror(project, mirror, monkeypatch, caplog):
    last = mirror["root"] / "mnist" / MNIST_FILES[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    project.write(params_for(MNIST))
    monkeypatch.setenv("DATA_MIRROR", str(mirror["root"]))
    code, error = run(caplog, "mnist")
    assert code == 1
    assert f"{last}: truncated or corrupt" in error
    assert_failed_cleanly(project)
    # the three files before it verified and stay cached; the truncated one is not
    assert cached_files(project) == sorted(f"mnist/{n}" for n in MNIST_FILES[:-1])


def test_failure_keeps_an_earlier_good_output(project, mirror, monkeypatch, caplog):
    project.write(params_for(MNIST))
    monkeypatch.setenv("DATA_MIRROR", str(mirror["root"]))
    assert run(caplog, "mnist")[0] == 0
    before = {p.name: p.read_bytes() for p in OUT.iterdir()}
    monkeypatch.setenv("DATA_MIRROR", "ftp://example.org")
    assert run(caplog, "mnist")[0] == 1
    assert {p.name: p.read_bytes() for p in OUT.iterdir()} == before
    assert leftovers(project) == []


# --------------------------------------------------------------------------- the download cache


def test_cached_files_are_not_fetched_again(project, served, server, caplog):
    project.write(params_for(MNIST, download=fast({"mirror": server.url})))
    assert run(caplog, "mnist")[0] == 0
    hits = dict(server.hits)
    assert run(caplog, "mnist", "--out", "data/raw/again") == (0, "")
    assert dict(server.hits) == hits
    assert caplog.text.count("not fetched again") == len(MNIST_FILES)
    for name in MNIST_FILES:
        assert Path("data/raw/again", name).read_bytes() == (OUT / name).read_bytes()


def test_cache_serves_with_the_server_gone(project, served, server, caplog):
    project.write(params_for(MNIST, download=fast({"mirror": server.url, "retries": 0})))
    assert run(caplog, "mnist")[0] == 0
    server.close()
    assert run(caplog, "mnist") == (0, "")
    assert "not fetched again" in caplog.text
    assert_mnist_out(project, served["root"] / "mnist", served["checksums"])


@pytest.mark.parametrize("damage", ["garbage", "other_payload", "truncated"])
def test_corrupted_cache_is_detected_and_fetched_again(project, served, server, caplog, damage):
    project.write(params_for(MNIST, download=fast({"mirror": server.url})))
    assert run(caplog, "mnist")[0] == 0
    victim = CACHE / "mnist" / MNIST_FILES[0]
    good = victim.read_bytes()
    if damage == "garbage":
        victim.write_bytes(b"\x00" * len(good))
    elif damage == "other_payload":
        victim.write_bytes(gzip.compress(b"not the pinned payload"))
    else:
        victim.write_bytes(good[: len(good) // 3])
    assert run(caplog, "mnist") == (0, "")
    assert "failed verification" in caplog.text
    assert server.hits[f"/mnist/{MNIST_FILES[0]}"] == 2
    assert all(server.hits[f"/mnist/{n}"] == 1 for n in MNIST_FILES[1:])
    assert victim.read_bytes() == good
    assert_mnist_out(project, served["root"] / "mnist", served["checksums"])


def test_corrupted_cache_with_the_source_gone_fails_cleanly(project, served, server, caplog):
    project.write(params_for(MNIST, download=fast({"mirror": server.url, "retries": 0})))
    assert run(caplog, "mnist")[0] == 0
    (CACHE / "mnist" / MNIST_FILES[0]).write_bytes(b"rotten")
    server.close()
    code, error = run(caplog, "mnist", "--out", "data/raw/second")
    assert code == 1 and "unreachable" in error
    assert_failed_cleanly(project, Path("data/raw/second"))
    assert f"mnist/{MNIST_FILES[0]}" not in cached_files(project)


# --------------------------------------------------------------------------- image folder sources


def images_params(path: str, sha: str | None = None, **download_settings) -> dict:
    source = {"path": path} if sha is None else {"path": path, "sha256": sha}
    return params_for({"imgs": {"source": source}}, download=fast({"retries": 1, **download_settings}))


IMGS = Path("data/raw/imgs")


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    image_folder(root, classes=("cat", "dog"), per_class=2)
    return root


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_image_directory_is_snapshotted_deterministically(project, images, caplog):
    project.write(images_params(str(images)))
    assert run(caplog, "imgs") == (0, "")
    first = (IMGS / "images.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(first)) as archive:
        names = archive.getnames()
        assert names == sorted(files_of(images))
        assert {n: archive.extractfile(n).read() for n in names} == files_of(images)
        assert {(m.mtime, m.mode, m.uid, m.gid) for m in archive.getmembers()} == {(0, 0o644, 0, 0)}
    manifest = json.loads((IMGS / "manifest.json").read_text())
    assert manifest == {"dataset": "imgs", "source": "image_folder", "format": "image_folder",
                        "files": {"images.tar": sha256(first)}, "checksum": "sha256 of file"}
    for path in images.rglob("*"):
        os.utime(path, (1_000_000, 1_000_000))  # new mtimes must not change the snapshot
    assert run(caplog, "imgs", "--out", "data/raw/imgs2") == (0, "")
    assert Path("data/raw/imgs2/images.tar").read_bytes() == first
    assert leftovers(project) == []


def test_image_directory_without_sha256_warns_with_the_digest(project, images, caplog):
    project.write(images_params(str(images)))
    assert run(caplog, "imgs")[0] == 0
    digest = sha256_file(IMGS / "images.tar")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"pin it with sha256: {digest}" in w and str(images) in w for w in warnings), warnings


def test_image_directory_with_its_pinned_sha256(project, images, caplog):
    project.write(images_params(str(images)))
    assert run(caplog, "imgs")[0] == 0
    digest = sha256_file(IMGS / "images.tar")
    project.write(images_params(str(images), digest))
    assert run(caplog, "imgs", "--out", "data/raw/pinned") == (0, "")
    assert "no sha256 pinned" not in caplog.text


def test_image_directory_with_a_wrong_sha256_is_refused(project, images, caplog):
    project.write(images_params(str(images), "0" * 64))
    code, error = run(caplog, "imgs")
    assert code == 1
    assert "checksum mismatch" in error and "0" * 64 in error
    assert_failed_cleanly(project, IMGS)


def test_image_directory_with_a_symlink_is_refused(project, images, tmp_path, caplog):
    (tmp_path / "outside.png").write_bytes(b"x")
    os.symlink(tmp_path / "outside.png", images / "train" / "cat" / "link.png")
    project.write(images_params(str(images)))
    code, error = run(caplog, "imgs")
    assert code == 1 and "link.png" in error and "symbolic link" in error
    assert_failed_cleanly(project, IMGS)


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
@pytest.mark.parametrize("pinned", [True, False])
def test_local_image_archive(project, images, tmp_path, caplog, kind, pinned):
    archive = tmp_path / f"images.{kind}"
    (tar_gz if kind == "tar.gz" else zip_folder)(images, archive)
    digest = sha256_file(archive)
    project.write(images_params(str(archive), digest if pinned else None))
    assert run(caplog, "imgs") == (0, "")
    assert (IMGS / archive.name).read_bytes() == archive.read_bytes()
    manifest = json.loads((IMGS / "manifest.json").read_text())
    assert manifest["files"] == {archive.name: digest}
    assert ("no sha256 pinned" in caplog.text) is not pinned
    if not pinned:
        assert f"pin it with sha256: {digest}" in caplog.text
    assert cached_files(project) == []  # local archives are not copied into the cache
    assert leftovers(project) == []


def test_local_image_archive_as_file_url(project, images, tmp_path, caplog):
    archive = zip_folder(images, tmp_path / "images.zip")
    project.write(images_params(archive.as_uri(), sha256_file(archive)))
    assert run(caplog, "imgs") == (0, "")
    assert (IMGS / "images.zip").read_bytes() == archive.read_bytes()


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_image_archive_over_http_is_cached_by_sha256(project, images, http_root, server, caplog, kind):
    archive = (tar_gz if kind == "tar.gz" else zip_folder)(images, http_root / f"images.{kind}")
    digest = sha256_file(archive)
    project.write(images_params(f"{server.url}/{archive.name}", digest))
    assert run(caplog, "imgs") == (0, "")
    assert (IMGS / archive.name).read_bytes() == archive.read_bytes()
    assert cached_files(project) == [f"image_folder/{digest}/{archive.name}"]
    assert server.hits == {f"/{archive.name}": 1}
    assert run(caplog, "imgs", "--out", "data/raw/again") == (0, "")
    assert server.hits == {f"/{archive.name}": 1}
    assert "not fetched again" in caplog.text
    assert_cache_verified(project)


def test_image_archive_over_http_without_sha256(project, images, http_root, server, caplog):
    archive = tar_gz(images, http_root / "images.tar.gz")
    project.write(images_params(f"{server.url}/images.tar.gz"))
    assert run(caplog, "imgs") == (0, "")
    assert f"pin it with sha256: {sha256_file(archive)}" in caplog.text
    assert (IMGS / "images.tar.gz").read_bytes() == archive.read_bytes()


@pytest.mark.parametrize("over", ["local", "http"])
def test_image_archive_with_wrong_sha256(project, images, tmp_path, http_root, request, caplog, over):
    folder = http_root if over == "http" else tmp_path
    archive = tar_gz(images, folder / "images.tar.gz")
    where = f"{request.getfixturevalue('server').url}/images.tar.gz" if over == "http" else str(archive)
    wrong = sha256(b"something else")
    project.write(images_params(where, wrong))
    code, error = run(caplog, "imgs")
    assert code == 1
    assert f"{where}: checksum mismatch" in error
    assert f"expected sha256 {wrong}" in error and f"got {sha256_file(archive)}" in error
    assert_failed_cleanly(project, IMGS)
    assert cached_files(project) == []


def test_truncated_image_archive_without_sha256(project, images, tmp_path, caplog):
    archive = tar_gz(images, tmp_path / "images.tar.gz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    project.write(images_params(str(archive)))
    code, error = run(caplog, "imgs")
    assert code == 1 and f"{archive}: truncated or corrupt" in error
    assert_failed_cleanly(project, IMGS)


def test_unsafe_image_archive_is_refused(project, tmp_path, http_root, server, caplog):
    archive = http_root / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../../escape.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"png"))
    project.write(images_params(f"{server.url}/evil.tar.gz", sha256_file(archive)))
    code, error = run(caplog, "imgs")
    assert code == 1 and "'../../escape.png'" in error and "escapes" in error
    assert_failed_cleanly(project, IMGS)
    assert cached_files(project) == []
    assert not (tmp_path / "escape.png").exists()


def test_image_source_that_is_not_an_archive(project, tmp_path, caplog):
    (tmp_path / "images.rar").write_bytes(b"Rar!")
    project.write(images_params(str(tmp_path / "images.rar")))
    code, error = run(caplog, "imgs")
    assert code == 1 and "images.rar" in error and "must be a directory or a" in error
    assert_failed_cleanly(project, IMGS)


def test_missing_image_archive(project, tmp_path, caplog):
    gone = tmp_path / "gone.zip"
    project.write(images_params(str(gone)))
    code, error = run(caplog, "imgs")
    assert code == 1 and f"{gone}: not found" in error
    assert_failed_cleanly(project, IMGS)


def test_missing_image_directory_says_not_found(project, tmp_path, caplog):
    gone = tmp_path / "my_images"
    project.write(images_params(str(gone)))
    code, error = run(caplog, "imgs")
    assert code == 1 and str(gone) in error and "not found" in error


# --------------------------------------------------------------------------- registry entries


def test_cifar10_jpeg_without_a_mirror_has_no_official_host(project, caplog):
    project.write(params_for({"cifar10": {"source": {"builtin": "cifar10_jpeg"}}}))
    code, error = run(caplog, "cifar10")
    assert code == 1
    assert "source 'cifar10_jpeg' has no official host" in error
    assert "DATA_MIRROR" in error and "cifar10-jpeg/cifar10-jpeg.tar.gz" in error
    assert_failed_cleanly(project, Path("data/raw/cifar10"))


def test_official_cifar10_missing_from_mirror_points_at_the_switch(project, caplog, monkeypatch, tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "cifar10-jpeg").mkdir(parents=True)
    monkeypatch.setenv("DATA_MIRROR", str(mirror))
    project.write(params_for({"cifar10": {"source": {"builtin": "cifar10"}}}))
    code, error = run(caplog, "cifar10")
    assert code == 1
    assert "cifar10/cifar-10-python.tar.gz: not found" in error
    assert "datasets.cifar10.source.builtin: cifar10_jpeg" in error
    assert_failed_cleanly(project, Path("data/raw/cifar10"))


# --------------------------------------------------------------------------- credentials in URLs


def test_credentials_never_logged_on_success(project, served, server, caplog):
    project.write(params_for(MNIST, download=fast({"mirror": with_credentials(server.url)})))
    assert run(caplog, "mnist") == (0, "")
    assert "***@127.0.0.1" in caplog.text  # the mirror was logged, redacted
    assert "secret" not in caplog.text
    assert all("secret" not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("failure", ["404", "503", "closed_port", "checksum"])
def test_credentials_never_logged_on_failure(project, request, tmp_path, monkeypatch, caplog, failure):
    if failure == "closed_port":
        request.getfixturevalue("mirror")  # pinned registry, no server needed
        url = f"http://127.0.0.1:{closed_port()}"
    else:
        served, server = request.getfixturevalue("served"), request.getfixturevalue("server")
        url = server.url
    if failure == "404":
        (served["root"] / "mnist" / MNIST_FILES[0]).unlink()
    elif failure == "503":
        server.fail_next(f"/mnist/{MNIST_FILES[0]}", 5)
    elif failure == "checksum":
        pin_source(monkeypatch, "mnist", write_idx_mirror(tmp_path / "other", seed=1)["checksums"])
    monkeypatch.setenv("DATA_MIRROR", with_credentials(url))
    project.write(params_for(MNIST, download=fast({"retries": 1, "backoff_s": 0.01})))
    code, error = run(caplog, "mnist")
    assert code == 1
    assert "***@127.0.0.1" in error
    assert "secret" not in caplog.text
    assert all("secret" not in r.getMessage() for r in caplog.records)
    assert_failed_cleanly(project)


def test_credentials_in_an_image_folder_url_never_logged(project, images, http_root, server, caplog):
    archive = zip_folder(images, http_root / "images.zip")
    project.write(images_params(f"{with_credentials(server.url)}/images.zip"))  # no sha256: warns with URL
    assert run(caplog, "imgs") == (0, "")
    assert f"pin it with sha256: {sha256_file(archive)}" in caplog.text
    assert "secret" not in caplog.text


# --------------------------------------------------------------------------- command line


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exited:
        download.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "dataset" in out and "--out" in out and "--params" in out


def test_missing_dataset_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        download.main([])
    assert exited.value.code == 2


def test_unknown_dataset_suggests_the_nearest(project, caplog):
    project.write(params_for(MNIST))
    code, error = run(caplog, "mnsit")
    assert code == 1
    assert "datasets.mnsit" in error and "did you mean 'mnist'?" in error
    assert not Path("data/raw/mnsit").exists()
    assert leftovers(project) == []


def test_unknown_dataset_far_from_any_name(project, caplog):
    project.write(params_for(MNIST))
    code, error = run(caplog, "zzzzzz")
    assert code == 1 and "datasets.zzzzzz" in error and "did you mean" not in error


def test_missing_params_file(project, caplog):
    code, error = run(caplog, "mnist", "--params", "nope.yaml")
    assert code == 1 and "nope.yaml" in error and "cannot read params file" in error


def test_invalid_download_settings_are_refused_before_any_work(project, mirror, caplog):
    project.write(params_for(MNIST, download=fast({"retries": -1})))
    code, error = run(caplog, "mnist")
    assert code == 1 and "download.retries" in error
    assert not Path("data").exists()
