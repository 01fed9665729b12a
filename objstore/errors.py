"""The error tree of the storage layer.

No SDK exception (botocore, oss2, fsspec) escapes a :class:`~objstore.base.Store`: every backend
translates its SDK's errors into these classes with ``raise ... from exc``, in one table per SDK.
Each class also inherits the matching builtin, so callers that only know the standard library
(``except FileNotFoundError``) keep working.

Configuration and URL mistakes are not storage errors: they are :class:`ConfigError`
(a ``ValueError``), raised before any request is made.
"""

from __future__ import annotations

import errno
import logging

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """Bad configuration: an unknown key, a missing profile, a malformed value."""


class InvalidURL(ConfigError):
    """A store URL that cannot be parsed or names an unknown scheme."""


class StorageError(OSError):
    """Base of every error a store raises.

    Attributes:
        url: the store (or object) the failed operation addressed, without credentials.
        operation: the store method that failed (``"stat"``, ``"get_range"``...).
    """

    default_errno = errno.EIO

    def __init__(self, message: str, *, url: str = "", operation: str = "") -> None:
        super().__init__(self.default_errno, message)
        self.message = message
        self.url = url
        self.operation = operation

    def __str__(self) -> str:
        return f"{self.message} ({self.url})" if self.url else self.message

    def __reduce__(self):  # keep pickling (multiprocessing, Ray) working with keyword args
        return (_rebuild, (type(self), self.message, self.url, self.operation))


def _rebuild(cls: type[StorageError], message: str, url: str, operation: str) -> StorageError:
    return cls(message, url=url, operation=operation)


class ObjectNotFound(StorageError, FileNotFoundError):
    """The object (key) does not exist."""

    default_errno = errno.ENOENT


class BucketNotFound(StorageError, FileNotFoundError):
    """The bucket, container or local root directory does not exist."""

    default_errno = errno.ENOENT


class UploadNotFound(StorageError, FileNotFoundError):
    """A multipart upload id that the store does not know (completed, aborted or expired)."""

    default_errno = errno.ENOENT


class AccessDenied(StorageError, PermissionError):
    """The credentials are valid but not allowed to do this."""

    default_errno = errno.EACCES


class InvalidCredentials(AccessDenied):
    """The store rejected the credentials themselves (unknown key id, bad signature)."""


class InvalidKey(StorageError):
    """A key that may not be used: ``..`` segments, a leading ``/``, empty, or reserved."""

    default_errno = errno.EINVAL


class NameTooLong(InvalidKey):
    """A key longer than the store accepts (S3: 1,024 bytes, OSS: 1,023)."""

    default_errno = errno.ENAMETOOLONG


class PreconditionFailed(StorageError):
    """A conditional request failed: the object changed (ETag mismatch) since it was read."""

    default_errno = errno.ESTALE


class NotSupported(StorageError):
    """The backend cannot do this operation (see its :class:`~objstore.base.Features`)."""

    default_errno = errno.EOPNOTSUPP


class InsufficientStorage(StorageError):
    """The destination is full (local disk full, quota exceeded)."""

    default_errno = errno.ENOSPC


class TransientError(StorageError):
    """A failure worth retrying: throttling, 5xx, a reset connection, a timeout."""

    default_errno = errno.EAGAIN


def is_permanent(exc: BaseException) -> bool:
    """Whether retrying ``exc`` cannot help: every error but :class:`TransientError` (and the
    network and timeout errors it stands for). The one classification every layer above the
    stores uses, so a refusal is never retried anywhere."""
    return not isinstance(exc, TransientError | TimeoutError | ConnectionError)


class SlowDown(TransientError):
    """The service asked us to slow down (S3 SlowDown / 503, OSS throttling)."""


class EndpointUnreachable(TransientError, ConnectionError):
    """The endpoint could not be reached (refused, DNS failure, connect or read timeout)."""

    default_errno = errno.EHOSTUNREACH
