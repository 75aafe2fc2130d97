"""Credentials in URLs: the one place that removes them before a URL is logged,
written to a file or shown in an error."""

from __future__ import annotations

import re
import urllib.parse


def _host(parts: urllib.parse.SplitResult) -> str:
    return (parts.hostname or "") + (f":{parts.port}" if parts.port else "")


def redact(location: str) -> str:
    """``location`` with any ``user:password@`` of its URL replaced by ``***@``."""
    parts = urllib.parse.urlsplit(location)
    if parts.username is None and parts.password is None:
        return location
    return urllib.parse.urlunsplit((parts.scheme, f"***@{_host(parts)}", parts.path, parts.query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``."""
    return re.sub(r"(\w[\w+.-]*://)[^/@\s]*@", r"\1***@", text)


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``http://user:pw@host/x`` -> (``http://host/x``, user, pw); other URIs unchanged."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or (parts.username is None and parts.password is None):
        return uri, None, None
    bare = urllib.parse.urlunsplit((parts.scheme, _host(parts), parts.path, parts.query, parts.fragment))
    return (bare, urllib.parse.unquote(parts.username or ""),
            urllib.parse.unquote(parts.password) if parts.password is not None else None)
