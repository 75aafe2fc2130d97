"""Fetching files over http(s), file:// URLs or plain paths, verified before use.

A file is written under a temporary name beside its target, checked, and only
then renamed into place, so nothing unverified ever sits at a target path.
Network errors and 5xx answers are retried with exponential backoff
(tenacity); 4xx answers are not. Credentials in URLs are redacted from every
message.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests
import tenacity

from stages import atomic
from stages.progress import Progress
from stages.archives import gunzip
from stages.errors import PipelineError
from stages.urls import redact

log = logging.getLogger(__name__)

CHUNK = 1 << 20
SCHEMES = ("http", "https", "file")


class FetchError(PipelineError):
    """A file could not be fetched: not found, unreachable, or refused."""

    next_step = ("check the URL or path in params.yaml, DATA_MIRROR and the network, then run dvc repro again "
                 "(verified files are kept in download.cache_dir)")


class ChecksumError(PipelineError):
    """A fetched file does not match its pinned checksum."""

    next_step = ("fetch it again; if the new file is the one you want, update its sha256 in params.yaml "
                 "(the message gives both digests)")


class _Transient(Exception):
    """A network failure worth retrying."""


@dataclass(frozen=True)
class Transport:
    retries: int = 4
    timeout_s: float = 60.0
    backoff_s: float = 1.0


def is_url(location: str) -> bool:
    return "://" in location


def local_path(location: str) -> Path | None:
    """The filesystem path for a plain path or a file:// URL; None for http(s)."""
    if not is_url(location):
        return Path(location)
    parts = urllib.parse.urlsplit(location)
    if parts.scheme not in SCHEMES:
        raise FetchError(
            f"{redact(location)}: unsupported URL scheme '{parts.scheme}' (only {', '.join(SCHEMES)})"
        )
    if parts.scheme == "file":
        return Path(urllib.parse.unquote(parts.path))
    return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str | None, source: str, payload: bool = False) -> None:
    """Raise ChecksumError unless the file (or its gunzipped payload) hashes to ``expected``.

    ``payload=True`` also proves the gzip stream is whole (a truncated one raises).
    """
    if payload:
        _, got = gunzip(path, source)
    elif expected is None:
        return
    else:
        got = sha256_file(path)
    if expected is not None and got != expected:
        what = "sha256 of decompressed payload" if payload else "sha256"
        raise ChecksumError(f"{source}: checksum mismatch: expected {what} {expected}, got {got}")


def _http_get(url: str, tmp: Path, transport: Transport, desc: str) -> None:
    shown = redact(url)
    try:
        with requests.get(url, stream=True, timeout=transport.timeout_s) as response:
            if response.status_code == 404:
                raise FetchError(f"{shown}: not found (HTTP 404)")
            if response.status_code >= 500 or response.status_code == 429:
                raise _Transient(f"{shown}: HTTP {response.status_code}")
            if response.status_code >= 400:
                raise FetchError(f"{shown}: refused (HTTP {response.status_code})")
            total = int(response.headers.get("Content-Length") or 0) or None
            written = 0
            with open(tmp, "wb") as handle, Progress(desc, total) as bar:
                # Raw bytes as sent: a .gz served with Content-Encoding: gzip stays compressed.
                for chunk in response.raw.stream(CHUNK, decode_content=False):
                    handle.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
            if total is not None and written != total:
                raise _Transient(f"{shown}: connection closed after {written:,} of {total:,} bytes")
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise _Transient(f"{shown}: {type(exc).__name__}: {exc}") from None
    except requests.RequestException as exc:
        raise FetchError(f"{shown}: {exc}") from None


def _copy_local(path: Path, tmp: Path, shown: str, desc: str) -> None:
    if not path.is_file():
        raise FetchError(f"{shown}: not found")
    with open(path, "rb") as src, open(tmp, "wb") as dst, Progress(desc, path.stat().st_size) as bar:
        while chunk := src.read(CHUNK):
            dst.write(chunk)
            bar.update(len(chunk))


def _transfer(location: str, tmp: Path, transport: Transport, desc: str) -> None:
    path = local_path(location)
    if path is not None:
        _copy_local(path, tmp, redact(location), desc)
        return
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(transport.retries + 1),
        wait=tenacity.wait_exponential(multiplier=transport.backoff_s, max=60),
        retry=tenacity.retry_if_exception_type(_Transient),
        before_sleep=lambda state: log.warning(
            "attempt %d failed (%s); retrying", state.attempt_number, state.outcome.exception()
        ),
        reraise=True,
    )
    try:
        for attempt in retrying:
            with attempt:
                _http_get(location, tmp, transport, desc)
    except _Transient as exc:
        host = urllib.parse.urlsplit(location).hostname
        raise FetchError(
            f"{redact(location)}: host {host} unreachable after {transport.retries + 1} attempts ({exc}). "
            "Offline? Point DATA_MIRROR at a mirror directory or URL laid out <mirror>/<dataset>/<file>."
        ) from None


def fetch(
    location: str,
    target: Path,
    verify: Callable[[Path], None],
    transport: Transport = Transport(),
) -> bool:
    """Make ``target`` a verified copy of ``location``; return True if it was fetched.

    An existing target that verifies is kept (a cache hit); one that does not is
    replaced. ``verify`` raises on a bad file. Nothing unverified is left at
    ``target``: the temporary file is removed on any failure.
    """
    shown = redact(location)
    if target.exists():
        try:
            verify(target)
            log.info("%s: cached copy verified, not fetched again", target)
            return False
        except PipelineError as exc:
            log.warning("%s: cached copy failed verification (%s); fetching again", target, exc)
            target.unlink()
    with atomic.replacing(target) as tmp:
        log.info("fetching %s", shown)
        _transfer(location, tmp, transport, desc=target.name)
        verify(tmp)
    return True


def copy_verified(cached: Path, target: Path) -> None:
    """Copy an already verified file to ``target`` through a temporary name."""
    with atomic.replacing(target) as tmp:
        shutil.copyfile(cached, tmp)
