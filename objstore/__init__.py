"""objstore: the one storage layer under pcache, babel_sync and ckpt.

Open a store from a URL and use the small synchronous, thread-safe interface of
:class:`~objstore.base.Store`::

    from objstore import open_store
    store = open_store("s3://region-a@datasets/tokens/", config=Config.load("objstore.toml"))
    page = store.list_page("shard-", limit=1000)

Opening a store makes no request; the first operation (or :meth:`Store.check_root`) does.
"""

from __future__ import annotations

import logging

from .base import ChecksumValue, Features, ListPage, ObjectInfo, PartInfo, Store, UploadInfo
from .config import Config, Profile, Secret
from .errors import (
    AccessDenied,
    BucketNotFound,
    ConfigError,
    EndpointUnreachable,
    InsufficientStorage,
    InvalidCredentials,
    InvalidKey,
    InvalidURL,
    NotSupported,
    ObjectNotFound,
    PreconditionFailed,
    SlowDown,
    StorageError,
    TransientError,
    UploadNotFound,
)
from .retry import AIMDLimiter, RetryPolicy
from .url import StoreURL, check_key, parse_url

log = logging.getLogger(__name__)

__all__ = [
    "AIMDLimiter",
    "AccessDenied",
    "BucketNotFound",
    "ChecksumValue",
    "Config",
    "ConfigError",
    "EndpointUnreachable",
    "Features",
    "InsufficientStorage",
    "InvalidCredentials",
    "InvalidKey",
    "InvalidURL",
    "ListPage",
    "NotSupported",
    "ObjectInfo",
    "ObjectNotFound",
    "PartInfo",
    "PreconditionFailed",
    "Profile",
    "RetryPolicy",
    "Secret",
    "SlowDown",
    "StorageError",
    "Store",
    "StoreURL",
    "TransientError",
    "UploadInfo",
    "UploadNotFound",
    "check_key",
    "open_object",
    "open_store",
    "parse_url",
]


def open_store(url: str | StoreURL, config: Config | None = None) -> Store:
    """Open the store a URL names, with endpoint and credentials from its profile.

    Args:
        url: ``s3://[PROFILE@]bucket/prefix``, ``oss://...``, ``file:///dir``, a plain local
            path, or any fsspec URL.
        config: profiles; defaults to ``Config.load()`` (``$OBJSTORE_CONFIG`` + environment).

    Raises:
        InvalidURL: the URL is malformed or names an unknown scheme.
        ConfigError: the profile is unknown.
    """
    parsed = url if isinstance(url, StoreURL) else parse_url(url)
    config = config if config is not None else Config.load()
    if parsed.scheme == "file":
        if parsed.profile:
            raise InvalidURL(f"local paths take no profile: {url}")
        from .local import LocalStore

        return LocalStore(parsed)
    profile = config.profile(parsed.profile, parsed.scheme)
    policy = RetryPolicy(max_attempts=profile.max_attempts, deadline=profile.retry_deadline)
    if parsed.scheme == "s3":
        from .s3 import S3Store

        return S3Store(parsed, profile, policy)
    if parsed.scheme == "oss":
        from .oss import OSSStore

        return OSSStore(parsed, profile, policy)
    from .fsspec_store import FsspecStore

    return FsspecStore(parsed, profile, policy)


def open_object(url: str, config: Config | None = None) -> tuple[Store, str]:
    """Open the store holding one object URL and return it with the object's key.

    ``s3://b/dir/file.bin`` opens ``s3://b/dir/`` and returns key ``file.bin``.
    """
    parsed = parse_url(url.rstrip("/"))
    if parsed.scheme == "file":
        import os

        parent, name = os.path.split(parsed.bucket)
        return open_store(StoreURL("file", None, parent or "/", ""), config), check_key(name)
    if not parsed.prefix:
        raise InvalidURL(f"{url!r} names a bucket, not an object")
    directory, _, name = parsed.prefix.rstrip("/").rpartition("/")
    root = StoreURL(
        parsed.scheme, parsed.profile, parsed.bucket, directory + "/" if directory else ""
    )
    return open_store(root, config), name
