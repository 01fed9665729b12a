"""POSIX attributes in object metadata (s3fs-fuse's conventions), and the error kinds the worker
protocol maps: no server."""

from __future__ import annotations

import stat

import pytest

from objstore.base import ObjectInfo
from objstore.errors import NameTooLong
from pcache.posix import (
    XATTR,
    Defaults,
    XattrError,
    attrs_of,
    check_xattr_name,
    format_time,
    format_xattrs,
    keep_foreign,
    metadata_bytes,
    new_attrs,
    parse_time,
    parse_xattrs,
    with_xattrs,
)
from pcache.protocol import (
    AlreadyExists,
    UploadFailed,
    WriteError,
    error_body,
    error_from_response,
    is_pending,
    pending_session,
)

DEFAULTS = Defaults(uid=1000, gid=100)


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("1600000000", 1_600_000_000_000_000_000),
        ("1600000000.000000005", 1_600_000_000_000_000_005),  # s3fs: nine digits of ns
        ("1600000000.5", 1_600_000_000_500_000_000),  # rclone: a float
        ("1600000000.123456789123", 1_600_000_000_123_456_789),
    ],
)
def test_times_read_as_s3fs_and_rclone_write_them(text: str, ns: int) -> None:
    assert parse_time(text) == ns


def test_times_written_as_s3fs_writes_them() -> None:
    assert format_time(1_600_000_000_000_000_000) == "1600000000"
    assert format_time(1_600_000_000_000_000_005) == "1600000000.000000005"
    for ns in (0, 1, 999_999_999, 1_700_000_000_123_456_789):
        assert parse_time(format_time(ns)) == ns
    assert parse_time("garbage") is None and parse_time("12.x") is None


def test_an_object_without_metadata_gets_the_defaults() -> None:
    attrs = attrs_of(ObjectInfo("k", 10, 1_600_000_000.25), DEFAULTS)
    assert attrs.mode == stat.S_IFREG | 0o644 and (attrs.uid, attrs.gid) == (1000, 100)
    assert attrs.mtime_ns == 1_600_000_000_250_000_000 == attrs.ctime_ns
    marker = attrs_of(ObjectInfo("d/", 0, 1.0), DEFAULTS, directory=True)
    assert marker.mode == stat.S_IFDIR | 0o755


def test_s3fs_metadata_round_trips() -> None:
    attrs = new_attrs(stat.S_IFREG, 0o4751, 7, 8, 1_700_000_000_000_000_001)
    meta = attrs.to_metadata()
    assert meta["mode"] == str(stat.S_IFREG | 0o4751) and meta["uid"] == "7"
    assert attrs_of(ObjectInfo("k", 1, 0.0, metadata=meta), DEFAULTS) == attrs
    link = new_attrs(stat.S_IFLNK, 0o777, 0, 0, 5)
    assert attrs_of(ObjectInfo("l", 3, 0.0, metadata=link.to_metadata()), DEFAULTS).is_symlink
    # a directory marker's mode says directory whatever its bits; unreadable values fall back
    odd = ObjectInfo("k", 1, 2.0, metadata={"mode": "abc", "uid": "-", "mtime": "x"})
    assert attrs_of(odd, DEFAULTS) == attrs_of(ObjectInfo("k", 1, 2.0), DEFAULTS)


def test_other_user_metadata_is_kept() -> None:
    attrs = new_attrs(stat.S_IFREG, 0o600, 1, 2, 3)
    kept = keep_foreign({"mode": "1", "owner-team": "ml", "mtime": "9"}, attrs)
    assert kept["owner-team"] == "ml" and kept["mode"] == str(stat.S_IFREG | 0o600)


def test_xattrs_in_s3fs_format() -> None:
    # s3fs's use_xattr layout: JSON-ish names to base64 values, percent-encoded as a whole
    # (the mount tests check it against Debian's s3fs both ways)
    value = format_xattrs({"user.b": b"\x00\xff", "user.a": b"hi"})
    assert value == "%7B%22user.a%22%3A%22aGk%3D%22%2C%22user.b%22%3A%22AP8%3D%22%7D"
    assert parse_xattrs({XATTR: value}) == {"user.a": b"hi", "user.b": b"\x00\xff"}
    assert parse_xattrs({XATTR: "%7B%7D"}) == {} and parse_xattrs({}) == {}
    # unreadable values are skipped, never an error
    assert parse_xattrs({XATTR: "not json"}) == {}
    assert parse_xattrs({XATTR: '{"user.ok":"b2s=","user.bad":"!!!"}'}) == {"user.ok": b"ok"}


@pytest.mark.parametrize(
    "name", ['user.a"b', "user.a,b", "user.a:b", "user.{", "", "user." + "n" * 251]
)
def test_xattr_names_the_format_cannot_hold(name: str) -> None:
    with pytest.raises(XattrError):
        check_xattr_name(name)
    assert isinstance(XattrError("x"), ValueError)


def test_xattrs_replace_only_their_own_key() -> None:
    metadata = {"mode": "33188", "color": "blue"}
    updated = with_xattrs(metadata, {"user.k": b"v"})
    assert updated["color"] == "blue" and parse_xattrs(updated) == {"user.k": b"v"}
    assert with_xattrs(updated, {}) == metadata  # the last one removed: no empty key left
    assert metadata_bytes({"mode": "33188", "k": "\u00e9"}) == 4 + 5 + 1 + 2


@pytest.mark.parametrize(
    ("exc", "status", "cls"),
    [
        (WriteError("no open write session 'x'"), 410, WriteError),
        (UploadFailed("the store refused 'k'"), 424, UploadFailed),
        (NameTooLong("key too long"), 414, NameTooLong),
        (FileExistsError(17, "exists"), 412, AlreadyExists),
    ],
)
def test_write_errors_cross_the_protocol_as_themselves(
    exc: Exception, status: int, cls: type[Exception]
) -> None:
    code, body = error_body(exc)
    assert code == status
    again = error_from_response(code, body, "http://w/x")
    assert (type(again) is cls and str(exc).strip("'") in str(again)) or isinstance(again, cls)


def test_pending_versions() -> None:
    assert is_pending("wb-abc123.42") and pending_session("wb-abc123.42") == "abc123"
    assert not is_pending('"d41d8cd98f00b204e9800998ecf8427e"')
