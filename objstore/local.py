"""The local-filesystem backend: a directory tree that behaves like a bucket.

- Keys map to paths under the root; keys with ``..``, empty or ``.`` segments, or a leading ``/``
  are rejected, so nothing escapes the root.
- Writes are atomic: data goes to a hidden temp file in the target directory, is fsynced, then
  renamed over the key. Readers never see a half-written object.
- Multipart parts are staged under ``ROOT/.objstore-uploads/<id>/`` and joined with
  ``copy_file_range`` (no copy through user space) on completion.
- User metadata lives in ``user.objstore.*`` extended attributes.
- Deleting the last object of a directory removes the empty directories above it, as a bucket
  has no empty "directories".
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

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
from .errors import (
    AccessDenied,
    InsufficientStorage,
    InvalidKey,
    ObjectNotFound,
    PreconditionFailed,
    StorageError,
    UploadNotFound,
)
from .retry import RetryPolicy
from .treewalk import Entry, TreeListing
from .url import RESERVED_PREFIX, StoreURL, check_key

log = logging.getLogger(__name__)

_UPLOADS_DIR = RESERVED_PREFIX + "uploads"
_TMP_PREFIX = RESERVED_PREFIX + "tmp-"
_XATTR_PREFIX = "user.objstore."
_UPLOAD_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_COPY_CHUNK = 64 * 1024 * 1024


def _etag(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"


class LocalStore(TreeListing, Store):
    """A directory as a store. See the module docstring for the on-disk layout.

    Args:
        url: parsed ``file://`` URL; ``url.bucket`` is the absolute root directory.
        fsync: flush data to disk before a write is acknowledged (durable, slower).
    """

    features = Features(
        native_checksum=None,
        server_side_copy=True,
        user_metadata=True,
        min_part_size=1,
        max_part_size=5 * 1024**3,
        max_parts=10_000,
        conditional_get=True,
        max_key_bytes=4096,
        max_metadata_bytes=4096,  # ext4 keeps all of a file's xattrs in one block
    )

    def __init__(
        self, url: StoreURL, retry_policy: RetryPolicy | None = None, *, fsync: bool = True
    ):
        super().__init__(url, retry_policy)
        self.root = Path(url.bucket)
        self.fsync = fsync

    # -- paths and errors ------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        check_key(key, url=str(self.url))
        parts = key.split("/")
        if "" in parts or "." in parts:
            raise InvalidKey(
                f"object key {key!r} has an empty or '.' path segment, which a directory tree "
                "cannot store distinctly",
                url=str(self.url),
            )
        return self.root.joinpath(*parts)

    @contextlib.contextmanager
    def _errors(self, operation: str, key: str = "") -> Iterator[None]:
        """Translate OSError into the storage error tree (the local backend's one table)."""
        try:
            yield
        except StorageError:
            raise
        except OSError as exc:
            code = exc.errno
            where = self.url.child(key) if key else str(self.url)
            if code in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
                if not self.root.is_dir():
                    raise bucket_not_found(self.url, operation) from exc
                if key:
                    raise not_found(self.url, key, operation) from exc
                raise ObjectNotFound(
                    f"not found: {exc.strerror}", url=where, operation=operation
                ) from exc
            if code in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise AccessDenied(
                    f"permission denied: {exc.strerror}", url=where, operation=operation
                ) from exc
            if code in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientStorage(
                    f"no space left: {exc.strerror}", url=where, operation=operation
                ) from exc
            raise StorageError(
                f"{operation} failed: {exc.strerror or exc}", url=where, operation=operation
            ) from exc

    def _require_root(self, operation: str) -> None:
        if not self.root.is_dir():
            raise bucket_not_found(self.url, operation)

    # -- reads -------------------------------------------------------------------------------

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        with self._errors("stat", key):
            st = path.stat()
            if not os.path.isfile(path):
                raise not_found(self.url, key, "stat")
            return ObjectInfo(
                key, st.st_size, st.st_mtime, _etag(st), None, self._read_metadata(path)
            )

    def _read_metadata(self, path: Path) -> dict[str, str]:
        try:
            names = os.listxattr(path)
        except OSError:
            return {}
        meta = {}
        for name in names:
            if name.startswith(_XATTR_PREFIX):
                with contextlib.suppress(OSError):
                    meta[name[len(_XATTR_PREFIX) :]] = os.getxattr(path, name).decode()
        return meta

    def _listdir(self, dir_key: str) -> list[Entry]:
        directory = self.root.joinpath(*dir_key.rstrip("/").split("/")) if dir_key else self.root
        entries = []
        try:
            with os.scandir(directory) as it:
                for d in it:
                    try:
                        if d.is_dir():
                            entries.append(Entry(d.name, True))
                        elif d.is_file():
                            st = d.stat()
                            entries.append(Entry(d.name, False, st.st_size, st.st_mtime, _etag(st)))
                    except FileNotFoundError:  # removed while we listed
                        continue
        except (FileNotFoundError, NotADirectoryError):
            return []
        return entries

    def get_range(
        self, key: str, start: int = 0, length: int | None = None, *, if_match: str | None = None
    ) -> bytes:
        check_range(start, length)
        path = self._path(key)
        with self._errors("get_range", key):
            fd = os.open(path, os.O_RDONLY)
            try:
                st = os.fstat(fd)
                if if_match is not None and _etag(st) != if_match:
                    raise PreconditionFailed(
                        f"object {key!r} changed since it was opened",
                        url=self.url.child(key),
                        operation="get_range",
                    )
                end = st.st_size if length is None else min(st.st_size, start + length)
                if start >= end:
                    return b""
                want = end - start
                buf = bytearray(want)
                view = memoryview(buf)
                got = 0
                while got < want:
                    n = os.preadv(fd, [view[got:]], start + got)
                    if n == 0:
                        break
                    got += n
                return bytes(buf) if got == want else bytes(buf[:got])
            finally:
                os.close(fd)

    # -- writes ------------------------------------------------------------------------------

    def _atomic_write(self, path: Path, writer, metadata: dict[str, str] | None) -> os.stat_result:
        """Write via ``writer(fd)`` into a temp file beside ``path``, then rename over it."""
        parent = path.parent
        self._make_parents(parent)
        tmp = parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                writer(fd)
                if self.fsync:
                    os.fdatasync(fd)
                for name, value in (metadata or {}).items():
                    os.setxattr(fd, _XATTR_PREFIX + name.lower(), value.encode())
            finally:
                os.close(fd)
            if path.is_dir():
                raise InvalidKey(
                    f"cannot store {path.name!r}: a directory of other objects has that name",
                    url=str(self.url),
                )
            os.rename(tmp, path)
            return path.stat()
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _make_parents(self, parent: Path) -> None:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise InvalidKey(
                f"cannot create directory {parent.relative_to(self.root)!s}: an object has that name",
                url=str(self.url),
            ) from None

    def put(self, key: str, data: Body, *, metadata: dict[str, str] | None = None) -> ObjectInfo:
        path = self._path(key)
        view = memoryview(data).cast("B")

        def write(fd: int) -> None:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])

        with self._errors("put", key):
            st = self._atomic_write(path, write, metadata)
        return ObjectInfo(key, st.st_size, st.st_mtime, _etag(st), None, dict(metadata or {}))

    def copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        src = self._path(src_key)
        dst = self._path(dst_key)
        with self._errors("copy", src_key):
            metadata = self._read_metadata(src)
            fd_in = os.open(src, os.O_RDONLY)
            try:
                st = self._atomic_write(dst, lambda fd: _copy_fd(fd_in, fd), metadata)
            finally:
                os.close(fd_in)
        return ObjectInfo(dst_key, st.st_size, st.st_mtime, _etag(st), None, metadata)

    def copy_from(self, src: Store, src_key: str, dst_key: str) -> ObjectInfo | None:
        if not isinstance(src, LocalStore):
            return None
        source = src._path(src_key)
        dst = self._path(dst_key)
        with src._errors("copy", src_key):
            metadata = src._read_metadata(source)
            fd_in = os.open(source, os.O_RDONLY)
        try:
            with self._errors("copy", dst_key):
                st = self._atomic_write(dst, lambda fd: _copy_fd(fd_in, fd), metadata)
        finally:
            os.close(fd_in)
        return ObjectInfo(dst_key, st.st_size, st.st_mtime, _etag(st), None, metadata)

    def replace_metadata(self, key: str, metadata: dict[str, str]) -> ObjectInfo:
        path = self._path(key)
        with self._errors("replace_metadata", key):
            if not os.path.isfile(path):
                raise not_found(self.url, key, "replace_metadata")
            for name in os.listxattr(path):
                if name.startswith(_XATTR_PREFIX):
                    os.removexattr(path, name)
            for name, value in metadata.items():
                os.setxattr(path, _XATTR_PREFIX + name.lower(), value.encode())
        return self.stat(key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._errors("delete", key):
            try:
                os.unlink(path)
            except FileNotFoundError:
                self._require_root("delete")
                return
            except IsADirectoryError:
                return
            self._prune_empty_dirs(path.parent)

    def _prune_empty_dirs(self, directory: Path) -> None:
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:  # not empty, or raced with a writer: both fine
                return
            directory = directory.parent

    # -- multipart ---------------------------------------------------------------------------

    def _upload_dir(self, upload_id: str, key: str) -> Path:
        if not _UPLOAD_ID_RE.match(upload_id):
            raise UploadNotFound(f"no such upload: {upload_id!r}", url=self.url.child(key))
        directory = self.root / _UPLOADS_DIR / upload_id
        if not directory.is_dir():
            raise UploadNotFound(f"no such upload: {upload_id!r}", url=self.url.child(key))
        return directory

    def create_upload(self, key: str, *, metadata: dict[str, str] | None = None) -> str:
        self._path(key)
        upload_id = uuid.uuid4().hex
        with self._errors("create_upload", key):
            directory = self.root / _UPLOADS_DIR / upload_id  # creates the root, as put() does
            directory.mkdir(parents=True)
            info = {"key": key, "metadata": metadata or {}, "initiated": time.time()}
            (directory / "upload.json").write_text(json.dumps(info))
        return upload_id

    def upload_part(self, key: str, upload_id: str, part_number: int, data: Body) -> PartInfo:
        if not 1 <= part_number <= self.features.max_parts:
            raise ValueError(f"part number {part_number} out of range 1..{self.features.max_parts}")
        directory = self._upload_dir(upload_id, key)
        view = memoryview(data).cast("B")
        path = directory / f"part-{part_number:05d}"

        def write(fd: int) -> None:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])

        with self._errors("upload_part", key):
            st = self._atomic_write(path, write, None)
        return PartInfo(part_number, _etag(st), st.st_size)

    def upload_part_copy(
        self,
        key: str,
        upload_id: str,
        part_number: int,
        src_key: str,
        start: int,
        length: int,
        *,
        if_match: str,
    ) -> PartInfo:
        data = self.get_range(src_key, start, length, if_match=if_match)
        if len(data) != length:
            raise PreconditionFailed(
                f"{src_key!r} has no bytes {start}..{start + length}", url=self.url.child(src_key)
            )
        return self.upload_part(key, upload_id, part_number, data)

    def complete_upload(self, key: str, upload_id: str, parts: list[PartInfo]) -> ObjectInfo:
        directory = self._upload_dir(upload_id, key)
        path = self._path(key)
        numbers = [p.part_number for p in parts]
        if not parts or numbers != sorted(set(numbers)):
            raise StorageError(
                "parts must be non-empty, ascending and unique", url=self.url.child(key)
            )
        with self._errors("complete_upload", key):
            info = json.loads((directory / "upload.json").read_text())
            files = []
            for part in parts:
                part_path = directory / f"part-{part.part_number:05d}"
                st = part_path.stat() if part_path.exists() else None
                if st is None or _etag(st) != part.etag:
                    raise StorageError(
                        f"part {part.part_number} is missing or changed",
                        url=self.url.child(key),
                        operation="complete_upload",
                    )
                files.append(part_path)

            def join(fd: int) -> None:
                for part_path in files:
                    src = os.open(part_path, os.O_RDONLY)
                    try:
                        _copy_fd(src, fd)
                    finally:
                        os.close(src)

            st = self._atomic_write(path, join, info["metadata"])
            shutil.rmtree(directory, ignore_errors=True)
        return ObjectInfo(key, st.st_size, st.st_mtime, _etag(st), None, dict(info["metadata"]))

    def list_parts(self, key: str, upload_id: str) -> list[PartInfo]:
        directory = self._upload_dir(upload_id, key)
        parts = []
        with self._errors("list_parts", key):
            for path in sorted(directory.glob("part-*")):
                st = path.stat()
                parts.append(PartInfo(int(path.name[5:]), _etag(st), st.st_size))
        return parts

    def abort_upload(self, key: str, upload_id: str) -> None:
        try:
            directory = self._upload_dir(upload_id, key)
        except UploadNotFound:
            return
        shutil.rmtree(directory, ignore_errors=True)

    def list_uploads(self, prefix: str = "") -> list[UploadInfo]:
        self._require_root("list_uploads")
        uploads = []
        base = self.root / _UPLOADS_DIR
        with self._errors("list_uploads"):
            for directory in sorted(base.iterdir()) if base.is_dir() else []:
                try:
                    info = json.loads((directory / "upload.json").read_text())
                except (OSError, ValueError):
                    continue  # being created or removed
                if info["key"].startswith(prefix):
                    uploads.append(UploadInfo(info["key"], directory.name, info["initiated"]))
        uploads.sort(key=lambda u: (u.key, u.initiated))
        return uploads


def _copy_fd(src: int, dst: int) -> None:
    """Copy all of ``src`` to ``dst`` in the kernel where possible."""
    offset = 0
    while True:
        try:
            n = os.copy_file_range(src, dst, _COPY_CHUNK, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            os.lseek(src, offset, os.SEEK_SET)
            while chunk := os.read(src, 8 * 1024 * 1024):
                os.write(dst, chunk)
            return
        if n == 0:
            return
        offset += n
