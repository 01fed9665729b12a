"""The generic backend: any filesystem fsspec reaches (memory, gcs, abfs, hdfs, sftp...).

fsspec has no paged listing, no multipart upload and no user metadata, so this adapter supplies
what it can from fsspec primitives: paged key-order listing through :mod:`objstore.treewalk` over
``fs.ls``, multipart uploads staged as hidden part files and joined by streaming on completion,
and ranged reads through ``fs.cat_file``. Metadata is refused with ``NotSupported`` rather than
silently dropped. Backend options come from the profile's ``storage_options`` table.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec

from .base import (
    Body,
    Features,
    ObjectInfo,
    PartInfo,
    Store,
    UploadInfo,
    bucket_not_found,
    check_range,
    not_found,
)
from .config import Profile
from .errors import (
    AccessDenied,
    NotSupported,
    PreconditionFailed,
    StorageError,
    UploadNotFound,
)
from .retry import RetryPolicy
from .treewalk import Entry, TreeListing
from .url import RESERVED_PREFIX, StoreURL, check_key

log = logging.getLogger(__name__)

_UPLOADS = RESERVED_PREFIX + "uploads"
_UPLOAD_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_STREAM_CHUNK = 8 * 1024 * 1024


def _mtime(info: dict[str, Any]) -> float:
    for name in ("mtime", "LastModified", "last_modified", "updated", "created", "modified"):
        value = info.get(name)
        if isinstance(value, dt.datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return 0.0


def _etag(info: dict[str, Any]) -> str:
    for name in ("ETag", "etag", "md5", "md5Hash", "checksum"):
        if info.get(name):
            return str(info[name]).strip('"')
    return f"{_mtime(info):.6f}-{int(info.get('size') or 0):x}"


class FsspecStore(TreeListing, Store):
    """A directory of an fsspec filesystem as a store."""

    features = Features(
        native_checksum=None,
        server_side_copy=True,
        user_metadata=False,
        min_part_size=1,
        conditional_get=False,
        replace_metadata=False,
        part_copy=False,
    )

    def __init__(self, url: StoreURL, profile: Profile, retry_policy: RetryPolicy | None = None):
        super().__init__(url, retry_policy)
        try:
            self.fs = fsspec.filesystem(url.scheme, **dict(profile.storage_options))
        except ImportError as exc:
            raise NotSupported(
                f"fsspec protocol {url.scheme!r} needs an extra package: {exc}", url=str(url)
            ) from exc
        self.root = self.fs._strip_protocol(f"{url.scheme}://{url.bucket}").rstrip("/")
        self.prefix = url.prefix

    def _path(self, key: str) -> str:
        return f"{self.root}/{self.prefix}{key}"

    def _checked_path(self, key: str) -> str:
        return self._path(check_key(key, url=str(self.url)))

    @contextlib.contextmanager
    def _errors(self, operation: str, key: str = "") -> Iterator[None]:
        """fsspec -> storage error tree: the fsspec backend's one translation table."""
        where = self.url.child(key) if key else str(self.url)
        try:
            yield
        except StorageError:
            raise
        except FileNotFoundError as exc:
            if not self.fs.exists(self.root):
                raise bucket_not_found(self.url, operation) from exc
            raise not_found(self.url, key, operation) from exc
        except PermissionError as exc:
            raise AccessDenied(f"permission denied: {exc}", url=where, operation=operation) from exc
        except NotImplementedError as exc:
            raise NotSupported(
                f"{operation} is not supported by {self.url.scheme}", url=where
            ) from exc
        except OSError as exc:
            raise StorageError(
                f"{operation} failed: {exc}", url=where, operation=operation
            ) from exc

    def _require_root(self, operation: str) -> None:
        if not self.fs.exists(self.root):
            raise bucket_not_found(self.url, operation)

    # -- reads -------------------------------------------------------------------------------

    def stat(self, key: str) -> ObjectInfo:
        path = self._checked_path(key)
        with self._errors("stat", key):
            info = self.fs.info(path)
        if info.get("type") == "directory":
            raise not_found(self.url, key, "stat")
        return ObjectInfo(key, int(info.get("size") or 0), _mtime(info), _etag(info))

    def _listdir(self, dir_key: str) -> list[Entry]:
        base = f"{self.root}/{self.prefix}{dir_key}".rstrip("/")
        try:
            infos = self.fs.ls(base, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        entries = []
        for info in infos:
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if info["name"].rstrip("/") == base:  # some filesystems list a file as itself
                continue
            if info.get("type") == "directory":
                entries.append(Entry(name, True))
            else:
                entries.append(
                    Entry(name, False, int(info.get("size") or 0), _mtime(info), _etag(info))
                )
        return entries

    def get_range(
        self, key: str, start: int = 0, length: int | None = None, *, if_match: str | None = None
    ) -> bytes:
        check_range(start, length)
        path = self._checked_path(key)
        with self._errors("get_range", key):
            if if_match is not None and _etag(self.fs.info(path)) != if_match:
                raise PreconditionFailed(
                    f"object {key!r} changed since it was opened", url=self.url.child(key)
                )
            end = None if length is None else start + length
            return bytes(self.fs.cat_file(path, start=start, end=end))

    # -- writes ------------------------------------------------------------------------------

    def _refuse_metadata(self, metadata: dict[str, str] | None, key: str) -> None:
        if metadata:
            raise NotSupported(
                f"{self.url.scheme}:// (fsspec) stores no user metadata",
                url=self.url.child(key),
                operation="put",
            )

    def put(self, key: str, data: Body, *, metadata: dict[str, str] | None = None) -> ObjectInfo:
        self._refuse_metadata(metadata, key)
        path = self._checked_path(key)
        with self._errors("put", key):
            self.fs.pipe_file(path, bytes(data))
        return self.stat(key)

    def copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        src, dst = self._checked_path(src_key), self._checked_path(dst_key)
        with self._errors("copy", src_key):
            self.fs.info(src)  # copy() of a missing file is a silent no-op on some filesystems
            self.fs.copy(src, dst)
        return self.stat(dst_key)

    def delete(self, key: str) -> None:
        path = self._checked_path(key)
        with self._errors("delete", key):
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                self._require_root("delete")

    # -- multipart (staged as hidden part files) ---------------------------------------------

    def _upload_dir(self, upload_id: str, key: str) -> str:
        directory = f"{self._path(_UPLOADS)}/{upload_id}"
        if not _UPLOAD_ID_RE.match(upload_id) or not self.fs.exists(f"{directory}/upload.json"):
            raise UploadNotFound(f"no such upload: {upload_id!r}", url=self.url.child(key))
        return directory

    def create_upload(self, key: str, *, metadata: dict[str, str] | None = None) -> str:
        self._refuse_metadata(metadata, key)
        self._checked_path(key)
        upload_id = uuid.uuid4().hex
        with self._errors("create_upload", key):
            self._require_root("create_upload")
            record = {"key": key, "initiated": time.time()}
            self.fs.pipe_file(
                f"{self._path(_UPLOADS)}/{upload_id}/upload.json", json.dumps(record).encode()
            )
        return upload_id

    def upload_part(self, key: str, upload_id: str, part_number: int, data: Body) -> PartInfo:
        directory = self._upload_dir(upload_id, key)
        path = f"{directory}/part-{part_number:05d}"
        with self._errors("upload_part", key):
            self.fs.pipe_file(path, bytes(data))
            info = self.fs.info(path)
        return PartInfo(part_number, _etag(info), int(info["size"]))

    def complete_upload(self, key: str, upload_id: str, parts: list[PartInfo]) -> ObjectInfo:
        directory = self._upload_dir(upload_id, key)
        numbers = [p.part_number for p in parts]
        if not parts or numbers != sorted(set(numbers)):
            raise StorageError(
                "parts must be non-empty, ascending and unique", url=self.url.child(key)
            )
        with self._errors("complete_upload", key):
            paths = []
            for part in parts:
                path = f"{directory}/part-{part.part_number:05d}"
                if not self.fs.exists(path) or _etag(self.fs.info(path)) != part.etag:
                    raise StorageError(
                        f"part {part.part_number} is missing or changed", url=self.url.child(key)
                    )
                paths.append(path)
            with self.fs.open(self._checked_path(key), "wb") as out:
                for path in paths:
                    with self.fs.open(path, "rb") as src:
                        while chunk := src.read(_STREAM_CHUNK):
                            out.write(chunk)
            self.fs.rm(directory, recursive=True)
        return self.stat(key)

    def list_parts(self, key: str, upload_id: str) -> list[PartInfo]:
        directory = self._upload_dir(upload_id, key)
        parts = []
        with self._errors("list_parts", key):
            for info in self.fs.ls(directory, detail=True):
                name = info["name"].rstrip("/").rsplit("/", 1)[-1]
                if name.startswith("part-"):
                    parts.append(PartInfo(int(name[5:]), _etag(info), int(info.get("size") or 0)))
        return sorted(parts, key=lambda p: p.part_number)

    def abort_upload(self, key: str, upload_id: str) -> None:
        try:
            directory = self._upload_dir(upload_id, key)
        except UploadNotFound:
            return
        with self._errors("abort_upload", key):
            self.fs.rm(directory, recursive=True)

    def list_uploads(self, prefix: str = "") -> list[UploadInfo]:
        self._require_root("list_uploads")
        uploads = []
        base = self._path(_UPLOADS)
        with self._errors("list_uploads"):
            if not self.fs.exists(base):
                return []
            for info in self.fs.ls(base, detail=True):
                upload_id = info["name"].rstrip("/").rsplit("/", 1)[-1]
                try:
                    record = json.loads(self.fs.cat_file(f"{base}/{upload_id}/upload.json"))
                except (FileNotFoundError, ValueError):
                    continue
                if record["key"].startswith(prefix):
                    uploads.append(UploadInfo(record["key"], upload_id, record["initiated"]))
        uploads.sort(key=lambda u: (u.key, u.initiated))
        return uploads
