"""The Aliyun OSS backend (oss2).

- oss2's own CRC check (``enable_crc``) runs crcmod in pure Python speed on every byte; it is off,
  and the same check runs here with the native CRC-64/XZ: every upload's CRC is compared with the
  ``x-oss-hash-crc64ecma`` the service returns, and a mismatch fails the write.
- The session's connection pool is sized from the profile (oss2's default is 10).
- Ranged reads send ``x-oss-range-behavior: standard`` so an out-of-range read is an error we
  turn into a short read, not a silent full-object response.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any

import oss2
import oss2.exceptions
import oss2.models

from . import checksum
from .base import (
    Body,
    ChecksumValue,
    Features,
    ListPage,
    ObjectInfo,
    PartInfo,
    Store,
    UploadInfo,
    bucket_not_found,
    check_range,
    not_found,
)
from .config import Profile
from .errors import EndpointUnreachable, ObjectNotFound, StorageError
from .httperrors import classify, describe, network_reason
from .retry import RetryPolicy, retrying
from .url import StoreURL, check_key, check_prefix

log = logging.getLogger(__name__)

_ALGO = "crc64xz"
_META = "x-oss-meta-"
_COPY_LIMIT = 1024**3  # CopyObject handles up to 1 GiB; larger objects copy part by part


class OSSStore(Store):
    """A bucket (plus prefix) on Aliyun OSS or an OSS-protocol endpoint."""

    features = Features(
        native_checksum=_ALGO,
        server_side_copy=True,
        user_metadata=True,
        min_part_size=100 * 1024,
        max_part_size=5 * 1024**3,
        max_parts=10_000,
        conditional_get=True,
        max_key_bytes=1023,
        max_metadata_bytes=8192,
    )

    def __init__(self, url: StoreURL, profile: Profile, retry_policy: RetryPolicy | None = None):
        super().__init__(url, retry_policy)
        self.profile = profile
        self.prefix = url.prefix
        self._bucket_checked = False
        endpoint = profile.endpoint or (
            f"https://oss-{profile.region}.aliyuncs.com"
            if profile.region
            else "https://oss-cn-hangzhou.aliyuncs.com"
        )
        self.endpoint = endpoint
        if profile.session_token:
            auth: Any = oss2.StsAuth(
                profile.access_key_id,
                profile.secret_access_key.reveal(),
                profile.session_token.reveal(),
            )
        else:
            auth = oss2.Auth(profile.access_key_id, profile.secret_access_key.reveal())
        session = oss2.Session(pool_size=profile.max_pool_connections)
        self.bucket = oss2.Bucket(
            auth,
            endpoint,
            url.bucket,
            session=session,
            connect_timeout=(profile.connect_timeout, profile.read_timeout),
            enable_crc=False,
        )

    # -- keys and errors -----------------------------------------------------------------

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key, url=str(self.url))

    @contextlib.contextmanager
    def _errors(self, operation: str, key: str = "") -> Iterator[None]:
        """oss2 -> storage error tree: the OSS backend's one translation table."""
        where = self.url.child(key) if key else str(self.url)
        try:
            yield
        except StorageError:
            raise
        except oss2.exceptions.RequestError as exc:  # no HTTP response: connect/read failure
            raise EndpointUnreachable(
                f"cannot reach {self.endpoint}: {network_reason(exc)}",
                url=where,
                operation=operation,
            ) from exc
        except oss2.exceptions.OssError as exc:
            status, code = int(exc.status), str(exc.code or "")
            if status == 404 and not code:
                if not self._bucket_exists():
                    raise bucket_not_found(self.url, operation) from exc
                raise not_found(self.url, key, operation) from exc
            if code == "NoSuchBucket":
                raise bucket_not_found(self.url, operation) from exc
            cls = classify(status, code)
            if cls is ObjectNotFound:
                raise not_found(self.url, key, operation) from exc
            raise cls(
                describe(status, code, str(exc.message or "")), url=where, operation=operation
            ) from exc

    def _bucket_exists(self) -> bool:
        if self._bucket_checked:
            return True
        try:
            self.bucket.list_objects_v2(max_keys=1)
        except oss2.exceptions.NoSuchBucket:
            return False
        except oss2.exceptions.OssError:
            return True
        self._bucket_checked = True
        return True

    def _verify_crc(self, key: str, expected: int, reported: int | None, operation: str) -> None:
        if reported is not None and reported != expected:
            raise StorageError(
                f"CRC-64 mismatch after {operation}: sent {expected}, service stored {reported}",
                url=self.url.child(key),
                operation=operation,
            )

    @staticmethod
    def _metadata_headers(metadata: dict[str, str] | None) -> dict[str, str]:
        return {_META + k.lower(): v for k, v in (metadata or {}).items()}

    # -- reads -------------------------------------------------------------------------------

    @property
    def directory_markers(self) -> bool:
        return self.profile.directory_markers

    @retrying
    def stat(self, key: str) -> ObjectInfo:
        with self._errors("stat", key):
            head = self.bucket.head_object(self._key(key))
            self._bucket_checked = True
        crc = head.server_crc
        metadata = {
            k[len(_META) :].lower(): v
            for k, v in head.headers.items()
            if k.lower().startswith(_META)
        }
        return ObjectInfo(
            key=key,
            size=int(head.content_length or 0),
            mtime=float(head.last_modified or 0),
            etag=str(head.etag or "").strip('"'),
            checksum=ChecksumValue(_ALGO, int(crc)) if crc is not None else None,
            metadata=metadata,
        )

    @retrying
    def list_page(
        self,
        prefix: str = "",
        *,
        start_after: str = "",
        delimiter: str = "",
        limit: int = 1000,
        token: str | None = None,
    ) -> ListPage:
        check_prefix(prefix, url=str(self.url))
        with self._errors("list"):
            resp = self.bucket.list_objects_v2(
                prefix=self.prefix + prefix,
                delimiter=delimiter,
                continuation_token=token or "",
                start_after="" if token or not start_after else self.prefix + start_after,
                max_keys=max(1, min(limit, 1000)),
            )
            self._bucket_checked = True
        cut = len(self.prefix)
        objects = [
            ObjectInfo(
                o.key[cut:], int(o.size), float(o.last_modified), str(o.etag or "").strip('"')
            )
            for o in resp.object_list
        ]
        prefixes = [p[cut:] for p in resp.prefix_list]
        return ListPage(
            objects, prefixes, resp.next_continuation_token if resp.is_truncated else None
        )

    @retrying
    def get_range(
        self, key: str, start: int = 0, length: int | None = None, *, if_match: str | None = None
    ) -> bytes:
        check_range(start, length)
        if length == 0:
            self.stat(key)
            return b""
        headers = {"x-oss-range-behavior": "standard"}
        if if_match:
            headers["If-Match"] = f'"{if_match}"'
        byte_range = None
        if start or length is not None:
            byte_range = (start, None if length is None else start + length - 1)
        with self._errors("get_range", key):
            try:
                resp = self.bucket.get_object(
                    self._key(key), byte_range=byte_range, headers=headers
                )
            except oss2.exceptions.ServerError as exc:
                if exc.status == 416:
                    return b""  # start at or past the end: a short read, as for a file
                raise
            try:
                return resp.read()
            finally:
                resp.close()

    # -- writes ------------------------------------------------------------------------------

    @retrying
    def put(self, key: str, data: Body, *, metadata: dict[str, str] | None = None) -> ObjectInfo:
        crc = checksum.compute(_ALGO, data)
        with self._errors("put", key):
            resp = self.bucket.put_object(
                self._key(key), bytes(data), headers=self._metadata_headers(metadata)
            )
        self._verify_crc(key, crc, resp.crc, "put")
        size = len(memoryview(data).cast("B"))
        return ObjectInfo(
            key,
            size,
            time.time(),
            str(resp.etag).strip('"'),
            ChecksumValue(_ALGO, crc),
            dict(metadata or {}),
        )

    @retrying
    def create_upload(self, key: str, *, metadata: dict[str, str] | None = None) -> str:
        with self._errors("create_upload", key):
            resp = self.bucket.init_multipart_upload(
                self._key(key), headers=self._metadata_headers(metadata)
            )
        return str(resp.upload_id)

    @retrying
    def upload_part(self, key: str, upload_id: str, part_number: int, data: Body) -> PartInfo:
        crc = checksum.compute(_ALGO, data)
        with self._errors("upload_part", key):
            resp = self.bucket.upload_part(self._key(key), upload_id, part_number, bytes(data))
        self._verify_crc(key, crc, resp.crc, "upload_part")
        size = len(memoryview(data).cast("B"))
        return PartInfo(part_number, str(resp.etag).strip('"'), size, ChecksumValue(_ALGO, crc))

    @retrying
    def complete_upload(self, key: str, upload_id: str, parts: list[PartInfo]) -> ObjectInfo:
        spec = [oss2.models.PartInfo(p.part_number, f'"{p.etag}"') for p in parts]
        with self._errors("complete_upload", key):
            resp = self.bucket.complete_multipart_upload(self._key(key), upload_id, spec)
            _drain(resp)
        size = sum(p.size for p in parts)
        whole = None
        if parts and all(p.checksum is not None for p in parts):
            whole = checksum.combine_parts(_ALGO, [(p.checksum.value, p.size) for p in parts])  # type: ignore[union-attr]
            self._verify_crc(key, whole, resp.crc, "complete_upload")
        elif resp.crc is not None:
            whole = int(resp.crc)
        return ObjectInfo(
            key,
            size,
            time.time(),
            str(resp.etag).strip('"'),
            ChecksumValue(_ALGO, whole) if whole is not None else None,
        )

    @retrying
    def list_parts(self, key: str, upload_id: str) -> list[PartInfo]:
        parts: list[PartInfo] = []
        marker = ""
        with self._errors("list_parts", key):
            while True:
                resp = self.bucket.list_parts(self._key(key), upload_id, marker=marker)
                for p in resp.parts:
                    crc = ChecksumValue(_ALGO, int(p.part_crc)) if p.part_crc is not None else None
                    parts.append(
                        PartInfo(int(p.part_number), str(p.etag).strip('"'), int(p.size), crc)
                    )
                if not resp.is_truncated:
                    return parts
                marker = resp.next_marker

    @retrying
    def get_object(self, key: str, *, if_match: str | None = None) -> tuple[bytes, ObjectInfo]:
        headers = {"If-Match": f'"{if_match}"'} if if_match else None
        with self._errors("get_object", key):
            resp = self.bucket.get_object(self._key(key), headers=headers)
            try:
                data = resp.read()
            finally:
                resp.close()
        crc = resp.server_crc
        metadata = {
            k[len(_META) :].lower(): v
            for k, v in resp.headers.items()
            if k.lower().startswith(_META)
        }
        info = ObjectInfo(
            key,
            int(resp.content_length if resp.content_length is not None else len(data)),
            float(resp.last_modified or 0),
            str(resp.etag or "").strip('"'),
            ChecksumValue(_ALGO, int(crc)) if crc is not None else None,
            metadata,
        )
        return data, info

    @retrying
    def abort_upload(self, key: str, upload_id: str) -> None:
        with self._errors("abort_upload", key):
            try:
                self.bucket.abort_multipart_upload(self._key(key), upload_id)
            except oss2.exceptions.NoSuchUpload:
                return

    @retrying
    def list_uploads(self, prefix: str = "") -> list[UploadInfo]:
        check_prefix(prefix, url=str(self.url))
        uploads: list[UploadInfo] = []
        key_marker = upload_id_marker = ""
        cut = len(self.prefix)
        with self._errors("list_uploads"):
            while True:
                resp = self.bucket.list_multipart_uploads(
                    prefix=self.prefix + prefix,
                    key_marker=key_marker,
                    upload_id_marker=upload_id_marker,
                )
                uploads.extend(
                    UploadInfo(u.key[cut:], u.upload_id, float(u.initiation_date))
                    for u in resp.upload_list
                )
                if not resp.is_truncated:
                    break
                key_marker, upload_id_marker = resp.next_key_marker, resp.next_upload_id_marker
        return uploads

    @retrying
    def copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        info = self.stat(src_key)
        if info.size > _COPY_LIMIT:
            return self._copy_multipart(src_key, dst_key, info)
        with self._errors("copy", src_key):
            _drain(
                self.bucket.copy_object(
                    self.bucket.bucket_name, self._key(src_key), self._key(dst_key)
                )
            )
        return self.stat(dst_key)

    @retrying
    def replace_metadata(self, key: str, metadata: dict[str, str]) -> ObjectInfo:
        info = self.stat(key)
        if info.size > _COPY_LIMIT:
            return self._copy_multipart(key, key, dataclasses.replace(info, metadata=metadata))
        headers = {"x-oss-metadata-directive": "REPLACE"}
        headers.update({f"{_META}{k}": v for k, v in metadata.items()})
        with self._errors("replace_metadata", key):
            _drain(
                self.bucket.copy_object(
                    self.bucket.bucket_name, self._key(key), self._key(key), headers=headers
                )
            )
        return self.stat(key)

    def copy_from(self, src: Store, src_key: str, dst_key: str) -> ObjectInfo | None:
        same = isinstance(src, OSSStore) and (
            src.endpoint,
            src.profile.access_key_id,
            src.profile.secret_access_key,
        ) == (self.endpoint, self.profile.access_key_id, self.profile.secret_access_key)
        if not same:
            return super().copy_from(src, src_key, dst_key)
        assert isinstance(src, OSSStore)
        if src.stat(src_key).size > _COPY_LIMIT:
            return None  # cross-bucket multipart copy: let the caller stream it
        self._copy_object(src.bucket.bucket_name, src._key(src_key), dst_key)
        return self.stat(dst_key)

    @retrying
    def _copy_object(self, bucket: str, key: str, dst_key: str) -> None:
        """One CopyObject into ``dst_key`` (idempotent: the same source lands again)."""
        with self._errors("copy", dst_key):
            _drain(self.bucket.copy_object(bucket, key, self._key(dst_key)))

    @retrying
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
        with self._errors("upload_part_copy", src_key):
            resp = self.bucket.upload_part_copy(
                self.bucket.bucket_name,
                self._key(src_key),
                (start, start + length - 1),
                self._key(key),
                upload_id,
                part_number,
                headers={"x-oss-copy-source-if-match": f'"{if_match}"'},
            )
        return PartInfo(part_number, str(resp.etag).strip('"'), length)

    def _copy_multipart(self, src_key: str, dst_key: str, info: ObjectInfo) -> ObjectInfo:
        upload_id = self.create_upload(dst_key, metadata=info.metadata)
        parts = []
        try:
            with self._errors("copy", src_key):
                for number, start in enumerate(range(0, info.size, _COPY_LIMIT), start=1):
                    end = min(info.size, start + _COPY_LIMIT) - 1
                    resp = self.bucket.upload_part_copy(
                        self.bucket.bucket_name,
                        self._key(src_key),
                        (start, end),
                        self._key(dst_key),
                        upload_id,
                        number,
                    )
                    parts.append(PartInfo(number, str(resp.etag).strip('"'), end - start + 1))
            self.complete_upload(dst_key, upload_id, parts)
        except BaseException:
            self.abort_upload(dst_key, upload_id)
            raise
        return self.stat(dst_key)

    @retrying
    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self.bucket.delete_object(self._key(key))


def _drain(result: Any) -> None:
    """oss2 leaves some XML response bodies unread, which keeps the connection out of the pool."""
    with contextlib.suppress(Exception):
        result.resp.read()
