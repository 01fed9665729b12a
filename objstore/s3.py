"""The S3 backend (boto3): AWS S3 and S3-compatible endpoints.

- One botocore client per store, with a connection pool sized for parallel transfers (the SDK
  default of 10 starves them) and botocore's own retries off: retries happen once, in
  :mod:`objstore.retry`, where throttling also lowers the caller's concurrency.
- Uploads carry a CRC-64/NVME the service verifies (``x-amz-checksum-crc64nvme``); multipart
  uploads declare a full-object CRC-64/NVME so the service reports one CRC for the whole object.
  botocore's default CRC32 on every request is switched off: we already send a better one.
- A HEAD 404 does not say whether the key or the bucket is missing; the first such answer is
  followed by one HeadBucket so a missing bucket is reported as such.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import email.utils
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, NoReturn

import botocore.exceptions

from . import checksum, http1, s3_data
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
from .errors import (
    EndpointUnreachable,
    InvalidCredentials,
    NotSupported,
    ObjectNotFound,
    StorageError,
)
from .httperrors import classify, describe, network_reason
from .retry import RetryPolicy, retrying
from .url import StoreURL, check_key, check_prefix

log = logging.getLogger(__name__)

_ALGO = "crc64nvme"
_COPY_PART = 1024**3


def fast_timestamp(value: str) -> datetime.datetime:
    """Parse the timestamps S3 sends (ISO 8601 in XML, RFC 1123 in headers) without dateutil.

    Falls back to botocore's own parser for anything else, so no response fails to parse.
    """
    try:
        if value[:4].isdigit():
            return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        return email.utils.parsedate_to_datetime(value)
    except (ValueError, TypeError, IndexError):
        import botocore.parsers

        return botocore.parsers.DEFAULT_TIMESTAMP_PARSER(value)


class S3Store(Store):
    """A bucket (plus prefix) on an S3-compatible endpoint."""

    features = Features(
        native_checksum=_ALGO,
        server_side_copy=True,
        user_metadata=True,
        min_part_size=5 * 1024 * 1024,
        max_part_size=5 * 1024**3,
        max_parts=10_000,
        conditional_get=True,
    )

    #: Build the boto3 client on first use instead of at open. A command the lean data path
    #: serves entirely (``babel-sync ls``) then never pays the half second that importing boto3
    #: and building a client costs. Off by default: opening a store then validates the SDK
    #: setup at once, as it always has. Command lines set it for their process.
    lazy_client: ClassVar[bool] = False

    def __init__(self, url: StoreURL, profile: Profile, retry_policy: RetryPolicy | None = None):
        super().__init__(url, retry_policy)
        self.profile = profile
        self.bucket = url.bucket
        self.prefix = url.prefix
        self._bucket_checked = False
        self._lock = threading.Lock()
        self._client: Any = None
        if not self.lazy_client:
            self._client = self._make_client()

        # Object GET/HEAD/PUT and list pages go through the lean data path where addressing allows it.
        self._data = (
            s3_data.S3DataPath(profile, url.bucket)
            if profile.endpoint and profile.addressing_style == "path"
            else None
        )

    @property
    def client(self) -> Any:
        """The boto3 client (created on first use when ``lazy_client`` is set)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        import boto3
        import botocore.config

        profile = self.profile
        config = botocore.config.Config(
            max_pool_connections=profile.max_pool_connections,
            connect_timeout=profile.connect_timeout,
            read_timeout=profile.read_timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": profile.addressing_style},  # type: ignore[arg-type]
            signature_version="s3v4",
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session()
        # botocore parses every timestamp with dateutil: about half of its CPU per listed key.
        factory = session._session.get_component("response_parser_factory")
        factory.set_parser_defaults(timestamp_parser=fast_timestamp)
        return session.client(
            "s3",
            endpoint_url=profile.endpoint or None,
            region_name=profile.region or "us-east-1",
            aws_access_key_id=profile.access_key_id or None,
            aws_secret_access_key=profile.secret_access_key.reveal() or None,
            aws_session_token=profile.session_token.reveal() or None,
            config=config,
        )

    @property
    def directory_markers(self) -> bool:
        return self.profile.directory_markers

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._data is not None:
            self._data.close()

    # -- keys and errors -----------------------------------------------------------------

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key, url=str(self.url))

    @contextlib.contextmanager
    def _errors(self, operation: str, key: str = "") -> Iterator[None]:
        """botocore -> storage error tree: the S3 backend's one translation table."""
        where = self.url.child(key) if key else str(self.url)
        try:
            yield
        except StorageError:
            raise
        except botocore.exceptions.ClientError as exc:
            err = exc.response.get("Error", {})
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            self._raise_http(
                status, str(err.get("Code", "")), str(err.get("Message", "")), operation, key, exc
            )
        except s3_data.HTTPError as exc:
            self._raise_http(exc.status, exc.code, exc.message, operation, key, exc)
        except http1.NetworkError as exc:  # the lean data path's network failures
            raise EndpointUnreachable(
                f"cannot reach {self.profile.endpoint}: {network_reason(exc)}",
                url=where,
                operation=operation,
            ) from exc
        except (
            botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectTimeoutError,
            botocore.exceptions.ReadTimeoutError,
            botocore.exceptions.ConnectionClosedError,
        ) as exc:
            raise EndpointUnreachable(
                f"cannot reach {self.profile.endpoint or 'S3'}: {network_reason(exc)}",
                url=where,
                operation=operation,
            ) from exc
        except (
            botocore.exceptions.ResponseStreamingError,
            botocore.exceptions.HTTPClientError,
        ) as exc:
            raise EndpointUnreachable(
                f"connection to {self.profile.endpoint or 'S3'} failed: {network_reason(exc)}",
                url=where,
                operation=operation,
            ) from exc
        except botocore.exceptions.NoCredentialsError as exc:
            raise InvalidCredentials(
                f"no credentials for profile {self.profile.name!r}", url=where, operation=operation
            ) from exc

    def _raise_http(
        self, status: int, code: str, message: str, operation: str, key: str, exc: Exception
    ) -> NoReturn:
        if status == 404 and code in ("404", "NotFound", ""):
            # HEAD responses have no body: find out whether the bucket itself is missing.
            if not self._bucket_exists():
                raise bucket_not_found(self.url, operation) from exc
            raise not_found(self.url, key, operation) from exc
        cls = classify(status, code)
        if cls is ObjectNotFound:
            raise not_found(self.url, key, operation) from exc
        if code == "NoSuchBucket":
            raise bucket_not_found(self.url, operation) from exc
        where = self.url.child(key) if key else str(self.url)
        raise cls(describe(status, code, message), url=where, operation=operation) from exc

    def _bucket_exists(self) -> bool:
        if self._bucket_checked:
            return True
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            return status != 404  # 403 and friends: the bucket exists, the key question stands
        self._bucket_checked = True
        return True

    def _info(self, key: str, head: Mapping[str, Any]) -> ObjectInfo:
        crc = None
        value = head.get("ChecksumCRC64NVME")
        if value and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT" and "-" not in value:
            crc = ChecksumValue(_ALGO, checksum.decode_header(_ALGO, value))
        return ObjectInfo(
            key=key,
            size=int(head.get("ContentLength", head.get("Size", 0))),
            mtime=head["LastModified"].timestamp(),
            etag=str(head.get("ETag", "")).strip('"'),
            checksum=crc,
            metadata={k.lower(): v for k, v in head.get("Metadata", {}).items()},
        )

    # -- reads -------------------------------------------------------------------------------

    @retrying
    def stat(self, key: str) -> ObjectInfo:
        with self._errors("stat", key):
            if self._data is not None:
                resp = self._data.request(
                    "HEAD", self._key(key), {"x-amz-checksum-mode": "ENABLED"}
                )
                head: Mapping[str, Any] = s3_data.boto_fields(resp.headers)
            else:
                head = self.client.head_object(
                    Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED"
                )
            self._bucket_checked = True
        return self._info(key, head)

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
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self.prefix + prefix,
            "MaxKeys": max(1, min(limit, 1000)),
        }
        if delimiter:
            args["Delimiter"] = delimiter
        if token:
            args["ContinuationToken"] = token
        elif start_after:
            args["StartAfter"] = self.prefix + start_after
        if self._data is not None:
            return self._list_page_lean(args)
        with self._errors("list"):
            resp = self.client.list_objects_v2(**args)
            self._bucket_checked = True
        cut = len(self.prefix)
        objects = [
            ObjectInfo(
                o["Key"][cut:],
                int(o["Size"]),
                o["LastModified"].timestamp(),
                str(o.get("ETag", "")).strip('"'),
            )
            for o in resp.get("Contents", [])
        ]
        prefixes = [p["Prefix"][cut:] for p in resp.get("CommonPrefixes", [])]
        next_token = resp.get("NextContinuationToken") if resp.get("IsTruncated") else None
        return ListPage(objects, prefixes, next_token)

    def _list_page_lean(self, args: dict[str, Any]) -> ListPage:
        assert self._data is not None
        query = {
            "list-type": "2",
            "encoding-type": "url",
            "prefix": args["Prefix"],
            "max-keys": str(args["MaxKeys"]),
        }
        for name, param in (("delimiter", "Delimiter"), ("continuation-token", "ContinuationToken"),
                            ("start-after", "StartAfter")):  # fmt: skip
            if param in args:
                query[name] = args[param]
        with self._errors("list"):
            got = s3_data.parse_list_v2(self._data.request("GET", "", query=query).data)
            self._bucket_checked = True
        cut = len(self.prefix)
        listed = ObjectInfo.listed
        if cut:
            objects = [listed(k[cut:], size, mtime, etag) for k, size, mtime, etag in got.contents]
            prefixes = [p[cut:] for p in got.prefixes]
        else:
            objects = [listed(k, size, mtime, etag) for k, size, mtime, etag in got.contents]
            prefixes = got.prefixes
        return ListPage(objects, prefixes, got.token if got.truncated and got.token else None)

    @retrying
    def get_range(
        self, key: str, start: int = 0, length: int | None = None, *, if_match: str | None = None
    ) -> bytes:
        check_range(start, length)
        if length == 0:
            self.stat(key)
            return b""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if start or length is not None:
            end = "" if length is None else str(start + length - 1)
            args["Range"] = f"bytes={start}-{end}"
        if if_match:
            args["IfMatch"] = f'"{if_match}"'
        if self._data is not None:
            headers = {"Range": args["Range"]} if "Range" in args else {}
            if if_match:
                headers["If-Match"] = args["IfMatch"]
            with self._errors("get_range", key):
                try:
                    return bytes(self._data.request("GET", args["Key"], headers).data)
                except s3_data.HTTPError as exc:
                    if exc.code == "InvalidRange" or exc.status == 416:
                        return b""  # start at or past the end: a short read, as for a file
                    raise
        with self._errors("get_range", key):
            try:
                resp = self.client.get_object(**args)
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b""  # start at or past the end: a short read, as for a file
                raise
            body = resp["Body"]
            try:
                return body.read()
            finally:
                body.close()

    # -- writes ------------------------------------------------------------------------------

    @retrying
    def put(self, key: str, data: Body, *, metadata: dict[str, str] | None = None) -> ObjectInfo:
        crc = checksum.compute(_ALGO, data)
        if self._data is not None:
            headers = {"x-amz-checksum-crc64nvme": checksum.encode_header(_ALGO, crc)}
            headers.update({f"x-amz-meta-{k}": v for k, v in (metadata or {}).items()})
            with self._errors("put", key):
                sent = self._data.request("PUT", self._key(key), headers, bytes(data))
            fields = s3_data.boto_fields(sent.headers)
            return self._written(key, fields, crc, len(memoryview(data).cast("B")), metadata)
        with self._errors("put", key):
            resp = self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=bytes(data) if not isinstance(data, bytes) else data,
                Metadata=metadata or {},
                ChecksumCRC64NVME=checksum.encode_header(_ALGO, crc),
            )
        return self._written(key, resp, crc, len(memoryview(data).cast("B")), metadata)

    def _written(
        self,
        key: str,
        resp: Mapping[str, Any],
        crc: int,
        size: int,
        metadata: dict[str, str] | None,
    ) -> ObjectInfo:
        return ObjectInfo(
            key=key,
            size=size,
            mtime=time.time(),
            etag=str(resp.get("ETag", "")).strip('"'),
            checksum=ChecksumValue(_ALGO, crc),
            metadata=dict(metadata or {}),
        )

    @retrying
    def create_upload(self, key: str, *, metadata: dict[str, str] | None = None) -> str:
        with self._errors("create_upload", key):
            resp = self.client.create_multipart_upload(
                Bucket=self.bucket,
                Key=self._key(key),
                Metadata=metadata or {},
                ChecksumAlgorithm="CRC64NVME",
                ChecksumType="FULL_OBJECT",
            )
        return str(resp["UploadId"])

    @retrying
    def upload_part(self, key: str, upload_id: str, part_number: int, data: Body) -> PartInfo:
        crc = checksum.compute(_ALGO, data)
        size = len(memoryview(data).cast("B"))
        if self._data is not None:
            headers = {"x-amz-checksum-crc64nvme": checksum.encode_header(_ALGO, crc)}
            query = {"partNumber": str(part_number), "uploadId": upload_id}
            with self._errors("upload_part", key):
                sent = self._data.request("PUT", self._key(key), headers, data, query=query)
            etag = sent.header("ETag").strip('"')
            return PartInfo(part_number, etag, size, ChecksumValue(_ALGO, crc))
        with self._errors("upload_part", key):
            resp = self.client.upload_part(
                Bucket=self.bucket,
                Key=self._key(key),
                UploadId=upload_id,
                PartNumber=part_number,
                Body=bytes(data) if not isinstance(data, bytes) else data,
                ChecksumCRC64NVME=checksum.encode_header(_ALGO, crc),
            )
        size = len(memoryview(data).cast("B"))
        return PartInfo(part_number, str(resp["ETag"]).strip('"'), size, ChecksumValue(_ALGO, crc))

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
            resp = self.client.upload_part_copy(
                Bucket=self.bucket,
                Key=self._key(key),
                UploadId=upload_id,
                PartNumber=part_number,
                CopySource={"Bucket": self.bucket, "Key": self._key(src_key)},
                CopySourceRange=f"bytes={start}-{start + length - 1}",
                CopySourceIfMatch=f'"{if_match}"',
            )
        result = resp.get("CopyPartResult") or {}
        if "ETag" not in result:  # rclone serve s3: a 200 without a result
            raise NotSupported(
                "the server answered UploadPartCopy without an ETag", url=self.url.child(key)
            )
        crc = result.get("ChecksumCRC64NVME")
        value = ChecksumValue(_ALGO, checksum.decode_header(_ALGO, crc)) if crc else None
        return PartInfo(part_number, str(result["ETag"]).strip('"'), length, value)

    @retrying
    def complete_upload(self, key: str, upload_id: str, parts: list[PartInfo]) -> ObjectInfo:
        spec = []
        for p in parts:
            entry: dict[str, Any] = {"PartNumber": p.part_number, "ETag": f'"{p.etag}"'}
            if p.checksum is not None:
                entry["ChecksumCRC64NVME"] = checksum.encode_header(_ALGO, p.checksum.value)
            spec.append(entry)
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._key(key),
            "UploadId": upload_id,
            "MultipartUpload": {"Parts": spec},
        }
        whole = None
        if parts and all(p.checksum is not None for p in parts):
            whole = checksum.combine_parts(_ALGO, [(p.checksum.value, p.size) for p in parts])  # type: ignore[union-attr]
            args["ChecksumCRC64NVME"] = checksum.encode_header(_ALGO, whole)
            args["ChecksumType"] = "FULL_OBJECT"
        with self._errors("complete_upload", key):
            resp = self.client.complete_multipart_upload(**args)
        size = sum(p.size for p in parts)
        info = self._written(key, resp, whole or 0, size, None)
        return info if whole is not None else ObjectInfo(info.key, size, info.mtime, info.etag)

    @retrying
    def list_parts(self, key: str, upload_id: str) -> list[PartInfo]:
        parts: list[PartInfo] = []
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "UploadId": upload_id}
        with self._errors("list_parts", key):
            while True:
                resp = self.client.list_parts(**args)
                for p in resp.get("Parts", []):
                    crc = p.get("ChecksumCRC64NVME")
                    value = (
                        ChecksumValue(_ALGO, checksum.decode_header(_ALGO, crc)) if crc else None
                    )
                    parts.append(
                        PartInfo(
                            int(p["PartNumber"]), str(p["ETag"]).strip('"'), int(p["Size"]), value
                        )
                    )
                if not resp.get("IsTruncated"):
                    return parts
                args["PartNumberMarker"] = resp["NextPartNumberMarker"]

    @retrying
    def get_object(self, key: str, *, if_match: str | None = None) -> tuple[bytes, ObjectInfo]:
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._key(key),
            "ChecksumMode": "ENABLED",
        }
        if if_match:
            args["IfMatch"] = f'"{if_match}"'
        if self._data is not None:
            headers = {"x-amz-checksum-mode": "ENABLED"}
            if if_match:
                headers["If-Match"] = args["IfMatch"]
            with self._errors("get_object", key):
                got = self._data.request("GET", args["Key"], headers)
            return bytes(got.data), self._info(key, s3_data.boto_fields(got.headers))
        with self._errors("get_object", key):
            resp = self.client.get_object(**args)
            body = resp["Body"]
            try:
                data = body.read()
            finally:
                body.close()
        return data, self._info(key, resp)

    def copy_from(self, src: Store, src_key: str, dst_key: str) -> ObjectInfo | None:
        if not isinstance(src, S3Store) or not self._same_account(src):
            return super().copy_from(src, src_key, dst_key)
        info = src.stat(src_key)
        if info.size > self.features.max_part_size:
            return None  # cross-bucket multipart copy: let the caller stream it
        self._copy_object({"Bucket": src.bucket, "Key": src._key(src_key)}, dst_key)
        return self.stat(dst_key)

    @retrying
    def _copy_object(self, source: Any, dst_key: str) -> None:
        """One CopyObject into ``dst_key`` (idempotent: the same source lands again)."""
        with self._errors("copy", dst_key):
            self.client.copy_object(Bucket=self.bucket, Key=self._key(dst_key), CopySource=source)

    def _same_account(self, other: S3Store) -> bool:
        mine, theirs = self.profile, other.profile
        return (mine.endpoint, mine.access_key_id, mine.secret_access_key) == (
            theirs.endpoint,
            theirs.access_key_id,
            theirs.secret_access_key,
        )

    @retrying
    def abort_upload(self, key: str, upload_id: str) -> None:
        with self._errors("abort_upload", key):
            try:
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self._key(key), UploadId=upload_id
                )
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
                    return
                raise

    @retrying
    def list_uploads(self, prefix: str = "") -> list[UploadInfo]:
        check_prefix(prefix, url=str(self.url))
        uploads: list[UploadInfo] = []
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
        cut = len(self.prefix)
        with self._errors("list_uploads"):
            while True:
                try:
                    resp = self.client.list_multipart_uploads(**args)
                except botocore.exceptions.ClientError as exc:
                    # rclone answers NoSuchUpload for a bucket that never had an upload
                    if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
                        return uploads
                    raise
                uploads.extend(
                    UploadInfo(u["Key"][cut:], u["UploadId"], u["Initiated"].timestamp())
                    for u in resp.get("Uploads", [])
                )
                if not resp.get("IsTruncated"):
                    break
                args["KeyMarker"] = resp.get("NextKeyMarker", "")
                args["UploadIdMarker"] = resp.get("NextUploadIdMarker", "")
        return uploads

    @retrying
    def copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        source: Any = {"Bucket": self.bucket, "Key": self._key(src_key)}
        info = self.stat(src_key)
        if info.size > self.features.max_part_size:
            return self._copy_multipart(src_key, dst_key, info)
        with self._errors("copy", src_key):
            self.client.copy_object(Bucket=self.bucket, Key=self._key(dst_key), CopySource=source)
        return self.stat(dst_key)

    def _copy_multipart(self, src_key: str, dst_key: str, info: ObjectInfo) -> ObjectInfo:
        """Objects over 5 GiB cannot be copied in one request: copy them part by part."""
        upload_id = self.create_upload(dst_key, metadata=info.metadata)
        source: Any = {"Bucket": self.bucket, "Key": self._key(src_key)}
        parts = []
        try:
            with self._errors("copy", src_key):
                for number, start in enumerate(range(0, info.size, _COPY_PART), start=1):
                    end = min(info.size, start + _COPY_PART) - 1
                    resp = self.client.upload_part_copy(
                        Bucket=self.bucket,
                        Key=self._key(dst_key),
                        UploadId=upload_id,
                        PartNumber=number,
                        CopySource=source,
                        CopySourceRange=f"bytes={start}-{end}",
                        CopySourceIfMatch=f'"{info.etag}"',
                    )
                    etag = str(resp["CopyPartResult"]["ETag"]).strip('"')
                    parts.append(PartInfo(number, etag, end - start + 1))
            self.complete_upload(dst_key, upload_id, parts)
        except BaseException:
            self.abort_upload(dst_key, upload_id)
            raise
        return self.stat(dst_key)

    @retrying
    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    @retrying
    def replace_metadata(self, key: str, metadata: dict[str, str]) -> ObjectInfo:
        info = self.stat(key)
        if info.size > self.features.max_part_size:
            return self._copy_multipart(key, key, dataclasses.replace(info, metadata=metadata))
        source: Any = {"Bucket": self.bucket, "Key": self._key(key)}
        with self._errors("replace_metadata", key):
            self.client.copy_object(
                Bucket=self.bucket,
                Key=self._key(key),
                CopySource=source,
                CopySourceIfMatch=f'"{info.etag}"',
                Metadata=metadata,
                MetadataDirective="REPLACE",
            )
        return self.stat(key)
