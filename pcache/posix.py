"""POSIX attributes in object user metadata, in s3fs-fuse's conventions.

An object store keeps bytes and a few string headers per key; a filesystem needs a type, mode,
owner and times. s3fs-fuse settled how these live in S3 (and rclone reads the same ``mtime``), so
one bucket reads alike through pcache, s3fs and rclone:

=====================  ===============================================================
``x-amz-meta-mode``    ``st_mode`` in decimal, file type bits included (``33188`` for a
                       0644 file; ``S_IFLNK | 0777`` for a symlink, ``S_IFDIR | ...``)
``x-amz-meta-uid/gid`` owner, decimal
``x-amz-meta-mtime``   seconds since the epoch, ``"SEC"`` or ``"SEC.NNNNNNNNN"`` (nanoseconds);
                       rclone writes a float with up to 9 decimals, read the same way
``x-amz-meta-ctime``   the same format (``atime`` is read, and written when set)
``x-amz-meta-xattr``   extended attributes: ``{"user.name":"BASE64","user.other":"..."}``
                       percent-encoded as a whole (s3fs's ``use_xattr`` format)
symlink                an object whose content is the target, mode ``S_IFLNK``
directory              a zero-byte ``dir/`` marker object (optional: a prefix with keys under
                       it is a directory too)
=====================  ===============================================================

Objects without these headers (put by other tools) get the defaults of :class:`Defaults`; the
``mtime`` then is the object's Last-Modified. Metadata keys here are without the provider prefix
(``mode``), as :class:`~objstore.base.ObjectInfo.metadata` holds them, lower-case.
"""

from __future__ import annotations

import base64
import binascii
import logging
import stat
import urllib.parse
from dataclasses import dataclass, replace

from objstore.base import ObjectInfo

log = logging.getLogger(__name__)

MODE, UID, GID, MTIME, CTIME, ATIME = "mode", "uid", "gid", "mtime", "ctime", "atime"
POSIX_KEYS = frozenset({MODE, UID, GID, MTIME, CTIME, ATIME})
SYMLINK_MAX = 4095  # PATH_MAX - 1: longer targets are refused with ENAMETOOLONG
XATTR = "xattr"  # the metadata key of the extended attributes (not one of POSIX_KEYS)
XATTR_NAMESPACE = "user."  # the only namespace kept: others are the kernel's or root's
XATTR_NAME_MAX = 255  # XATTR_NAME_MAX of <linux/limits.h>
_XATTR_UNSAFE = frozenset('",:{}')  # would break the format's plain splitting


@dataclass(frozen=True)
class Defaults:
    """What an object without POSIX metadata looks like."""

    uid: int
    gid: int
    file_mode: int = 0o644
    dir_mode: int = 0o755


@dataclass(frozen=True)
class Attrs:
    """The POSIX attributes of one file, directory or symlink (times in nanoseconds)."""

    mode: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    atime_ns: int

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def with_mode(self, mode: int, now_ns: int) -> Attrs:
        """``chmod``: the permission bits change, the file type stays; ctime moves."""
        return replace(self, mode=stat.S_IFMT(self.mode) | stat.S_IMODE(mode), ctime_ns=now_ns)

    def to_metadata(self) -> dict[str, str]:
        return {
            MODE: str(self.mode),
            UID: str(self.uid),
            GID: str(self.gid),
            MTIME: format_time(self.mtime_ns),
            CTIME: format_time(self.ctime_ns),
            ATIME: format_time(self.atime_ns),
        }


def new_attrs(kind: int, mode: int, uid: int, gid: int, now_ns: int) -> Attrs:
    """The attributes of something just created (``create``, ``mkdir``, ``symlink``)."""
    return Attrs(kind | stat.S_IMODE(mode), uid, gid, now_ns, now_ns, now_ns)


def format_time(ns: int) -> str:
    """s3fs's format: whole seconds, or seconds and nine digits of nanoseconds."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    return str(seconds) if nanos == 0 else f"{seconds}.{nanos:09d}"


def parse_time(value: str) -> int | None:
    """Nanoseconds from ``"SEC"`` / ``"SEC.FRACTION"``; None when unreadable."""
    whole, _, fraction = value.strip().partition(".")
    if not whole.lstrip("-").isdigit() or (fraction and not fraction.isdigit()):
        return None
    nanos = int((fraction + "000000000")[:9]) if fraction else 0
    return int(whole) * 1_000_000_000 + nanos


def _int(metadata: dict[str, str], name: str) -> int | None:
    value = metadata.get(name)
    if value is None:
        return None
    try:
        return int(value.strip(), 0) if value.strip().startswith("0o") else int(value.strip())
    except ValueError:
        log.debug("ignoring unreadable %s=%r", name, value)
        return None


def attrs_of(info: ObjectInfo, defaults: Defaults, *, directory: bool = False) -> Attrs:
    """The attributes an object (or a ``dir/`` marker, ``directory=True``) stands for."""
    meta = info.metadata
    mtime = parse_time(meta[MTIME]) if MTIME in meta else None
    if mtime is None:
        mtime = round(info.mtime * 1_000_000) * 1000  # Last-Modified: microseconds at best
    ctime = parse_time(meta[CTIME]) if CTIME in meta else None
    atime = parse_time(meta[ATIME]) if ATIME in meta else None
    mode = _int(meta, MODE)
    if directory:
        kind = stat.S_IFDIR
        perms = defaults.dir_mode if mode is None else stat.S_IMODE(mode)
    elif mode is not None and stat.S_IFMT(mode) in (stat.S_IFLNK, stat.S_IFREG):
        kind, perms = stat.S_IFMT(mode), stat.S_IMODE(mode)
    else:
        kind = stat.S_IFREG
        perms = defaults.file_mode if mode is None else stat.S_IMODE(mode)
    uid, gid = _int(meta, UID), _int(meta, GID)
    return Attrs(
        kind | perms,
        defaults.uid if uid is None else uid,
        defaults.gid if gid is None else gid,
        mtime,
        mtime if ctime is None else ctime,
        mtime if atime is None else atime,
    )


def foreign_of(metadata: dict[str, str]) -> dict[str, str]:
    """The user metadata that is not a POSIX attribute (extended attributes, other tools')."""
    return {k: v for k, v in metadata.items() if k not in POSIX_KEYS}


def keep_foreign(metadata: dict[str, str], attrs: Attrs) -> dict[str, str]:
    """``attrs`` as metadata, keeping the object's other user metadata (not ours to drop)."""
    kept = foreign_of(metadata)
    kept.update(attrs.to_metadata())
    return kept


class XattrError(ValueError):
    """An extended attribute name the format cannot hold (``EINVAL`` at the mount)."""


def parse_xattrs(metadata: dict[str, str]) -> dict[str, bytes]:
    """The extended attributes in ``metadata`` (empty when none or unreadable)."""
    raw = metadata.get(XATTR)
    if not raw:
        return {}
    text = urllib.parse.unquote(raw).strip()
    if not (text.startswith("{") and text.endswith("}")):
        log.debug("ignoring unreadable xattr metadata %r", raw[:80])
        return {}
    xattrs: dict[str, bytes] = {}
    for pair in text[1:-1].split(","):
        name, sep, value = pair.partition(":")
        name, value = name.strip().strip('"'), value.strip().strip('"')
        if not sep or not name:
            continue
        try:
            xattrs[name] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            log.debug("ignoring unreadable xattr %r", name)
    return xattrs


def check_xattr_name(name: str) -> None:
    """Refuse a name this format cannot round-trip (quotes, commas, colons, braces)."""
    if not name or _XATTR_UNSAFE & set(name) or len(name.encode()) > XATTR_NAME_MAX:
        raise XattrError(f"extended attribute name {name!r} cannot be stored")


def format_xattrs(xattrs: dict[str, bytes]) -> str:
    """The metadata value for ``xattrs`` (s3fs writes the same bytes)."""
    body = ",".join(
        f'"{name}":"{base64.b64encode(value).decode()}"' for name, value in sorted(xattrs.items())
    )
    return urllib.parse.quote("{" + body + "}", safe="")


def with_xattrs(metadata: dict[str, str], xattrs: dict[str, bytes]) -> dict[str, str]:
    """``metadata`` with its extended attributes replaced (the key dropped when none)."""
    updated = {k: v for k, v in metadata.items() if k != XATTR}
    if xattrs:
        updated[XATTR] = format_xattrs(xattrs)
    return updated


def metadata_bytes(metadata: dict[str, str]) -> int:
    """What the store counts against its user-metadata limit: UTF-8 bytes of keys and values."""
    return sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())
