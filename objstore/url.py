"""Parsing store URLs and checking object keys.

A store URL names a *root*: a bucket plus an optional prefix, or a local directory::

    s3://bucket/prefix/          s3://PROFILE@bucket/prefix     (profile selects endpoint+keys)
    oss://PROFILE@bucket/prefix  file:///abs/dir                 /abs/dir or ./rel/dir (local)
    memory://bucket/prefix       gcs://...                       (any other fsspec protocol)

Keys handed to a store are relative to that root. A key never contains a ``..`` segment, never
starts with ``/`` and is never empty, so no key can escape a local root or a cache directory.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from urllib.parse import unquote

from .errors import InvalidKey, InvalidURL

log = logging.getLogger(__name__)

NATIVE_SCHEMES = ("s3", "oss", "file")
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)
_PROFILE_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# Keys beginning with this are the local backends' own bookkeeping (temp files, upload parts).
RESERVED_PREFIX = ".objstore-"


@dataclass(frozen=True)
class StoreURL:
    """A parsed store URL.

    Attributes:
        scheme: ``s3``, ``oss``, ``file`` or an fsspec protocol.
        profile: profile name, or ``None`` for the default profile.
        bucket: bucket name; for ``file`` the absolute root directory.
        prefix: key prefix inside the bucket, empty or ending in ``/``.
    """

    scheme: str
    profile: str | None
    bucket: str
    prefix: str = ""

    def __str__(self) -> str:
        # parse_url percent-decodes the path, so a literal '%' must be escaped to round-trip.
        if self.scheme == "file":
            return f"file://{self.bucket.replace('%', '%25')}"
        who = f"{self.profile}@" if self.profile else ""
        return f"{self.scheme}://{who}{self.bucket}/{self.prefix.replace('%', '%25')}"

    def child(self, key: str) -> str:
        """The URL of ``key`` under this root, for messages."""
        base = str(self)
        return base + key if base.endswith("/") else f"{base}/{key}"


def parse_url(url: str) -> StoreURL:
    """Parse a store URL; plain paths are local directories.

    Raises:
        InvalidURL: with a message naming what is wrong.
    """
    if not isinstance(url, str) or not url.strip():
        raise InvalidURL("empty store URL")
    match = _SCHEME_RE.match(url)
    if match is None:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", url) and not re.match(r"^[A-Za-z]:[\\/]", url):
            scheme = url.split(":", 1)[0]
            raise InvalidURL(f"malformed URL {url!r}: expected {scheme}://BUCKET/PREFIX")
        return StoreURL("file", None, _local_root(url), "")
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "file":
        host, _, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise InvalidURL(
                f"malformed URL {url!r}: file URLs are file:///absolute/path (got host {host!r})"
            )
        return StoreURL("file", None, _local_root("/" + unquote(path)), "")
    authority, _, path = rest.partition("/")
    profile: str | None = None
    if "@" in authority:
        profile, _, authority = authority.rpartition("@")
        if not _PROFILE_RE.match(profile):
            raise InvalidURL(f"malformed URL {url!r}: bad profile name {profile!r}")
    bucket = authority
    if not bucket:
        raise InvalidURL(
            f"malformed URL {url!r}: no bucket name (expected {scheme}://BUCKET/PREFIX)"
        )
    if scheme in ("s3", "oss") and not _BUCKET_RE.match(bucket):
        raise InvalidURL(f"malformed URL {url!r}: {bucket!r} is not a valid bucket name")
    prefix = unquote(path)
    if prefix:
        if not prefix.endswith("/"):
            prefix += "/"
        try:
            check_key(prefix.rstrip("/"), url=url)
        except InvalidKey as exc:  # a URL mistake is a ValueError, not a storage error
            raise InvalidURL(f"malformed URL {url!r}: bad prefix: {exc.message}") from None
        if "//" in prefix:
            raise InvalidURL(f"malformed URL {url!r}: empty path segment in prefix")
    if scheme not in NATIVE_SCHEMES:
        _require_fsspec_protocol(scheme, url)
    return StoreURL(scheme, profile, bucket, prefix)


def _local_root(path: str) -> str:
    if "\x00" in path:
        raise InvalidURL("local path contains a NUL byte")
    return os.path.abspath(os.path.expanduser(path))


def _require_fsspec_protocol(scheme: str, url: str) -> None:
    from fsspec.registry import known_implementations, registry

    known = set(known_implementations) | set(registry)
    if scheme not in known:
        raise InvalidURL(
            f"unknown scheme {scheme!r} in {url!r}: use s3://, oss://, file:// or an fsspec "
            "protocol (memory, gcs, abfs, hdfs, ...)"
        )


def check_key(key: str, *, url: str = "") -> str:
    """Return ``key`` if it is a safe relative object key, else raise InvalidKey.

    Rejected: empty keys, a leading ``/``, ``.``/``..``/empty path segments' escape forms
    (``..`` anywhere as a segment), NUL bytes, and the reserved bookkeeping prefix.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKey("empty object key", url=url)
    if key.startswith("/"):
        raise InvalidKey(f"object key {key!r} is absolute (starts with '/')", url=url)
    if "\x00" in key:
        raise InvalidKey(f"object key {key!r} contains a NUL byte", url=url)
    parts = key.split("/")
    if ".." in parts:
        raise InvalidKey(f"object key {key!r} contains a '..' segment", url=url)
    if any(part.startswith(RESERVED_PREFIX) for part in parts):
        raise InvalidKey(
            f"object key {key!r} uses the reserved prefix {RESERVED_PREFIX!r}", url=url
        )
    return key


def check_prefix(prefix: str, *, url: str = "") -> str:
    """Like :func:`check_key` but allows the empty prefix and a trailing ``/``."""
    if prefix:
        check_key(prefix.rstrip("/") or "/", url=url)
    return prefix
