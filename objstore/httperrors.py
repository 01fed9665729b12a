"""Classifying an object-store HTTP error (status + error code) into the storage error tree.

S3 and OSS share most error codes (both descend from the same REST protocol), so the SDK
backends each extract ``(status, code, message)`` from their own exceptions and call
:func:`classify` here; what differs per SDK (exception types, connection errors) stays in the
backend's own translation function.
"""

from __future__ import annotations

import logging

from .errors import (
    AccessDenied,
    BucketNotFound,
    InsufficientStorage,
    InvalidCredentials,
    InvalidKey,
    NameTooLong,
    NotSupported,
    ObjectNotFound,
    PreconditionFailed,
    SlowDown,
    StorageError,
    TransientError,
    UploadNotFound,
)

log = logging.getLogger(__name__)

_BY_CODE: dict[str, type[StorageError]] = {
    "NoSuchKey": ObjectNotFound,
    "NoSuchBucket": BucketNotFound,
    "NoSuchUpload": UploadNotFound,
    "AccessDenied": AccessDenied,
    "AllAccessDisabled": AccessDenied,
    "AccountProblem": AccessDenied,
    "InvalidAccessKeyId": InvalidCredentials,
    "SignatureDoesNotMatch": InvalidCredentials,
    "InvalidToken": InvalidCredentials,
    "ExpiredToken": InvalidCredentials,
    "InvalidSecurityToken": InvalidCredentials,
    "SecurityTokenExpired": InvalidCredentials,
    "PreconditionFailed": PreconditionFailed,
    "SlowDown": SlowDown,
    "Throttling": SlowDown,
    "ThrottlingException": SlowDown,
    "RequestLimitExceeded": SlowDown,
    "TooManyRequests": SlowDown,
    "ServiceUnavailable": SlowDown,
    "InternalError": TransientError,
    "RequestTimeout": TransientError,
    "RequestTimeTooSkewed": TransientError,
    "OperationAborted": TransientError,
    "NotImplemented": NotSupported,
    "QuotaExceeded": InsufficientStorage,
    "KeyTooLongError": NameTooLong,
    "InvalidObjectName": InvalidKey,  # OSS
}


def classify(status: int, code: str) -> type[StorageError]:
    """The error class for an HTTP status and service error code."""
    if code in _BY_CODE:
        return _BY_CODE[code]
    if status in (429, 503):
        return SlowDown
    if status >= 500 or status == 408:
        return TransientError
    if status == 403:
        return AccessDenied
    if status == 412:
        return PreconditionFailed
    if status == 501:
        return NotSupported
    return StorageError


def describe(status: int, code: str, message: str) -> str:
    """One line a user can act on, e.g. ``AccessDenied (HTTP 403): Access Denied``."""
    what = code or "error"
    text = f"{what} (HTTP {status})" if status > 0 else what
    if message and message != code:
        text += f": {message}"
    cls = classify(status, code)
    if cls is InvalidCredentials:
        text += " - check the access key id and secret of this profile"
    return text


_NETWORK_REASONS = (
    ("refused", "connection refused"),
    ("timed out", "timed out"),
    ("timeout", "timed out"),
    ("name or service not known", "unknown host"),
    ("nodename nor servname", "unknown host"),
    ("temporary failure in name resolution", "DNS lookup failed"),
    ("reset by peer", "connection reset"),
    ("connection aborted", "connection reset"),
    ("remote end closed", "connection closed by the server"),
    ("no route to host", "no route to host"),
    ("network is unreachable", "network unreachable"),
)


def network_reason(exc: BaseException) -> str:
    """A short reason for a failure below HTTP (refused, timed out...), from an SDK exception."""
    text = " ".join(str(e) for e in (exc, exc.__cause__, exc.__context__) if e is not None).lower()
    for needle, reason in _NETWORK_REASONS:
        if needle in text:
            return reason
    return "connection failed"
