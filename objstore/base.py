"""The Store interface every backend implements, and the helpers built on it.

A :class:`Store` is one root (a bucket plus prefix, or a local directory) of one backend. Keys are
relative to the root. The core is synchronous and thread-safe: one Store is shared by many
threads, and async callers wrap calls in their runtime's to-thread helper.

Call order for a multipart upload::

    upload_id = store.create_upload(key)
    part = store.upload_part(key, upload_id, 1, data)      # any order, any threads, retries ok
    ...
    info = store.complete_upload(key, upload_id, [part1, part2, ...])   # or abort_upload(...)

Backends implement the abstract methods; the helpers here (``get``, ``iter_list``, ``exists``,
``put_parts``...) are concrete and shared, so no backend re-implements them.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .errors import BucketNotFound, NameTooLong, NotSupported, ObjectNotFound
from .retry import AIMDLimiter, RetryPolicy
from .streams import RangeReader
from .url import StoreURL

log = logging.getLogger(__name__)

Body = bytes | bytearray | memoryview


@dataclass(frozen=True)
class ChecksumValue:
    """A CRC as a service reported it: algorithm name (see :mod:`objstore.checksum`) and value."""

    algorithm: str
    value: int

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.value:016x}"


@dataclass(frozen=True)
class Features:
    """What a backend can do; callers branch on these, never on ``hasattr``.

    Attributes:
        native_checksum: the whole-object CRC the service reports (``crc64xz``, ``crc64nvme``)
            or ``None``. Present on ``ObjectInfo.checksum`` when the server returns it.
        server_side_copy: ``copy`` runs inside the service, without moving bytes through us.
        user_metadata: ``put``/``create_upload`` metadata is stored and returned by ``stat``.
        min_part_size: smallest non-final multipart part.
        max_part_size: largest part.
        max_parts: most parts in one upload.
        delimiter: listing with a delimiter is supported (always ``/``).
        conditional_get: ``get_range(..., if_match=etag)`` is enforced by the service.
        max_key_bytes: the longest key (UTF-8 bytes, the root's prefix included) it stores.
        replace_metadata: :meth:`Store.replace_metadata` works (in place, content untouched).
        part_copy: :meth:`Store.upload_part_copy` runs inside the service (UploadPartCopy).
        max_metadata_bytes: the most user metadata one object carries, counted as the UTF-8
            bytes of its keys (without the provider's prefix) and values (S3: 2 KB, OSS: 8 KB).
    """

    native_checksum: str | None = None
    server_side_copy: bool = True
    user_metadata: bool = True
    min_part_size: int = 5 * 1024 * 1024
    max_part_size: int = 5 * 1024**3
    max_parts: int = 10_000
    delimiter: bool = True
    conditional_get: bool = True
    max_key_bytes: int = 1024
    replace_metadata: bool = True
    part_copy: bool = True
    max_metadata_bytes: int = 2048


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or stat says about one object.

    Attributes:
        key: key relative to the store root.
        size: bytes.
        mtime: last-modified time, seconds since the epoch.
        etag: the service's entity tag (unquoted); opaque, not a content hash for multipart.
        checksum: the service-reported whole-object CRC, when known (stat, not listings).
        metadata: user metadata (lower-case keys), when known (stat, not listings).
    """

    key: str
    size: int
    mtime: float
    etag: str = ""
    checksum: ChecksumValue | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def listed(cls, key: str, size: int, mtime: float, etag: str = "") -> ObjectInfo:
        """``ObjectInfo(key, size, mtime, etag)`` for listings, at a third of the cost: the
        frozen dataclass ``__init__`` sets each field through ``object.__setattr__``, which
        dominates when a listing builds millions of these."""
        info = object.__new__(cls)
        fields = info.__dict__
        fields["key"] = key
        fields["size"] = size
        fields["mtime"] = mtime
        fields["etag"] = etag
        fields["checksum"] = None
        fields["metadata"] = {}
        return info

    @property
    def version(self) -> str:
        """A string that changes whenever the content changes (ETag, else mtime+size)."""
        return self.etag or f"{self.mtime:.6f}-{self.size}"


@dataclass(frozen=True)
class ListPage:
    """One page of a listing, in key order (UTF-8 byte order).

    Attributes:
        objects: objects on this page.
        prefixes: common prefixes (``dir/``) when listing with a delimiter.
        token: pass back as ``token`` for the next page; ``None`` when the listing is done.
    """

    objects: list[ObjectInfo]
    prefixes: list[str]
    token: str | None

    @property
    def last_key(self) -> str:
        """The greatest key or prefix on the page (a ``start_after`` for range splitting)."""
        return max(
            (self.objects[-1].key if self.objects else ""),
            (self.prefixes[-1] if self.prefixes else ""),
        )


@dataclass(frozen=True)
class PartInfo:
    """A completed multipart part: what ``complete_upload`` needs back."""

    part_number: int
    etag: str
    size: int
    checksum: ChecksumValue | None = None


@dataclass(frozen=True)
class UploadInfo:
    """An in-progress multipart upload, as ``list_uploads`` reports it."""

    key: str
    upload_id: str
    initiated: float


class Store(ABC):
    """One root of one storage backend.

    Thread-safety: every method may be called from many threads at once.

    Attributes:
        url: the parsed root URL (never contains credentials).
        features: what this backend supports.
        retry_policy: how transient errors are retried.
        limiter: optional AIMD limiter that throttling responses shrink.
    """

    features: Features = Features()

    def __init__(self, url: StoreURL, retry_policy: RetryPolicy | None = None) -> None:
        self.url = url
        self.retry_policy = retry_policy or RetryPolicy()
        self.limiter: AIMDLimiter | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.url)!r})"

    @property
    def directory_markers(self) -> bool:
        """Zero-byte ``dir/`` keys are stored as objects here (empty directories persist)."""
        return False

    # -- the abstract core ---------------------------------------------------------------

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size, mtime, ETag, native checksum and metadata of ``key``.

        Raises:
            ObjectNotFound: no such key.
            BucketNotFound: the root does not exist.
        """

    @abstractmethod
    def list_page(
        self,
        prefix: str = "",
        *,
        start_after: str = "",
        delimiter: str = "",
        limit: int = 1000,
        token: str | None = None,
    ) -> ListPage:
        """One page of keys that start with ``prefix``, in UTF-8 byte order.

        Args:
            prefix: only keys starting with this (relative to the root).
            start_after: only keys strictly greater than this (range splitting).
            delimiter: ``"/"`` to roll keys up into common prefixes, or ``""``.
            limit: at most this many objects + prefixes (capped at 1000).
            token: the previous page's ``token`` to continue a listing.

        Raises:
            BucketNotFound: the root does not exist.
        """

    @abstractmethod
    def get_range(
        self, key: str, start: int = 0, length: int | None = None, *, if_match: str | None = None
    ) -> bytes:
        """Read ``length`` bytes of ``key`` from ``start`` (to the end when ``None``).

        A range past the end is short (empty when ``start >= size``), as for a file.

        Raises:
            ObjectNotFound: no such key.
            PreconditionFailed: ``if_match`` is given and the object's ETag differs.
        """

    @abstractmethod
    def put(self, key: str, data: Body, *, metadata: dict[str, str] | None = None) -> ObjectInfo:
        """Store ``data`` as ``key``, atomically replacing any previous object."""

    @abstractmethod
    def create_upload(self, key: str, *, metadata: dict[str, str] | None = None) -> str:
        """Start a multipart upload of ``key`` and return its upload id."""

    @abstractmethod
    def upload_part(self, key: str, upload_id: str, part_number: int, data: Body) -> PartInfo:
        """Upload part ``part_number`` (1-based); uploading a number again replaces it."""

    @abstractmethod
    def complete_upload(self, key: str, upload_id: str, parts: list[PartInfo]) -> ObjectInfo:
        """Assemble ``parts`` (ascending part numbers) into the object ``key``.

        Raises:
            UploadNotFound: the upload id is unknown.
        """

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
        """Make part ``part_number`` of an upload from ``length`` bytes of ``src_key`` at
        ``start``, inside the service (S3/OSS UploadPartCopy); ``if_match``: the source's ETag.

        Raises:
            PreconditionFailed: the source is not that version any more.
            NotSupported: the backend cannot (``features.part_copy``).
        """
        raise NotSupported(
            f"{type(self).__name__} cannot copy parts server-side", url=self.url.child(key)
        )

    @abstractmethod
    def list_parts(self, key: str, upload_id: str) -> list[PartInfo]:
        """The parts the service holds for an upload, ascending (to resume after a crash).

        Raises:
            UploadNotFound: the upload id is unknown.
        """

    @abstractmethod
    def abort_upload(self, key: str, upload_id: str) -> None:
        """Discard an upload and its parts; an unknown id is not an error."""

    @abstractmethod
    def list_uploads(self, prefix: str = "") -> list[UploadInfo]:
        """In-progress multipart uploads whose keys start with ``prefix``."""

    @abstractmethod
    def copy(self, src_key: str, dst_key: str) -> ObjectInfo:
        """Copy an object inside this store (server-side where ``features`` says so)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""

    def replace_metadata(self, key: str, metadata: dict[str, str]) -> ObjectInfo:
        """Replace the user metadata of ``key``, keeping its content (S3/OSS: a copy onto
        itself); what ``chmod`` or ``touch`` on a mount become.

        Raises:
            ObjectNotFound: no such key.
            NotSupported: the backend keeps no user metadata (``features.replace_metadata``).
        """
        raise NotSupported(
            f"{type(self).__name__} cannot replace object metadata", url=self.url.child(key)
        )

    def check_key_length(self, key: str) -> None:
        """Raise :class:`NameTooLong` when the store could never hold ``key``."""
        limit = self.features.max_key_bytes - len(self.url.prefix.encode())
        if len(key.encode("utf-8", "surrogateescape")) > limit:
            raise NameTooLong(
                f"key of {len(key.encode('utf-8', 'surrogateescape'))} bytes is longer than this "
                f"store accepts ({limit})",
                url=str(self.url),
            )

    # -- concrete helpers ------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        """The whole object."""
        return self.get_range(key, 0, None)

    def get_object(self, key: str, *, if_match: str | None = None) -> tuple[bytes, ObjectInfo]:
        """The whole object and what the service says about it (size, ETag, checksum, metadata).

        Backends that return all of it in the GET response override this to make one request.
        """
        info = self.stat(key)
        return self.get_range(key, 0, None, if_match=if_match or info.etag or None), info

    def copy_from(self, src: Store, src_key: str, dst_key: str) -> ObjectInfo | None:
        """Copy ``src_key`` of another store into this one inside the service, if possible.

        Returns ``None`` when the two stores cannot copy server-side (different endpoints or
        credentials, different backends); the caller then moves the bytes itself.
        """
        if src is self:
            return self.copy(src_key, dst_key)
        return None

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    def check_root(self) -> None:
        """Make one cheap request to prove the root exists and the credentials work.

        Raises:
            BucketNotFound, AccessDenied, InvalidCredentials, EndpointUnreachable.
        """
        self.list_page("", limit=1)

    def iter_pages(
        self, prefix: str = "", *, start_after: str = "", delimiter: str = "", limit: int = 1000
    ) -> Iterator[ListPage]:
        """Every page of a listing, following tokens."""
        token: str | None = None
        while True:
            page = self.list_page(
                prefix, start_after=start_after, delimiter=delimiter, limit=limit, token=token
            )
            yield page
            if page.token is None:
                return
            token = page.token

    def iter_list(self, prefix: str = "", *, start_after: str = "") -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` (recursive), in key order."""
        for page in self.iter_pages(prefix, start_after=start_after):
            yield from page.objects

    def put_parts(
        self,
        key: str,
        chunks: Iterable[Body],
        *,
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        """Upload ``chunks`` as the parts of one multipart object, aborting on failure.

        Each chunk but the last must be at least ``features.min_part_size``.
        """
        upload_id = self.create_upload(key, metadata=metadata)
        try:
            parts = [
                self.upload_part(key, upload_id, number, chunk)
                for number, chunk in enumerate(chunks, start=1)
            ]
            return self.complete_upload(key, upload_id, parts)
        except BaseException:
            try:
                self.abort_upload(key, upload_id)
            except Exception as exc:  # the original error matters more
                log.warning("could not abort upload %s of %s: %s", upload_id, key, exc)
            raise

    def open_read(self, key: str, *, block_size: int = 8 * 1024 * 1024) -> RangeReader:
        """A read-only, seekable file object over ``key`` (ranged reads, pinned to its ETag)."""
        return RangeReader(self, key, block_size=block_size)

    def close(self) -> None:  # noqa: B027 - an optional hook: stores without pools need nothing
        """Release connection pools. The store must not be used afterwards."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_range(start: int, length: int | None) -> None:
    """The one check of ``get_range`` arguments every backend makes before a request."""
    if start < 0 or (length is not None and length < 0):
        raise ValueError(f"invalid range: start={start}, length={length}")


def not_found(url: StoreURL, key: str, operation: str) -> ObjectNotFound:
    """The one way backends phrase a missing object."""
    return ObjectNotFound(f"no such object: {key!r}", url=url.child(key), operation=operation)


def bucket_not_found(url: StoreURL, operation: str) -> BucketNotFound:
    """The one way backends phrase a missing root."""
    what = "directory" if url.scheme == "file" else "bucket"
    return BucketNotFound(
        f"{what} does not exist: {url.bucket!r}", url=str(url), operation=operation
    )
