"""How the conformance suite reaches each backend: one ``BackendCase`` per backend, each able to
make a fresh bucket, a store with wrong credentials, and (where a network is involved) inject
transient HTTP errors into the real request path."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import fsspec

from objstore import Config, Store, open_store
from objstore.retry import RetryPolicy
from tests.conftest import unique_bucket

FAST_RETRY = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05, deadline=10)


@dataclass
class BackendCase:
    """One backend under test.

    Attributes:
        name: backend id used in test ids.
        make_store: opens a store on a fresh, existing, empty bucket.
        missing_bucket_store: opens a store whose bucket does not exist.
        bad_credentials_store: opens a store with a wrong secret (None: no credentials concept).
        inject_transient: makes the next N requests fail with 503 (None: no transport to fault).
        server_gaps: behaviours the test server lacks (not the backend), each with the reason;
            tests of them skip here and run on a server that has them.
    """

    name: str
    make_store: Callable[[], Store]
    missing_bucket_store: Callable[[], Store]
    bad_credentials_store: Callable[[], Store] | None = None
    inject_transient: Callable[[int], None] | None = None
    server_gaps: dict[str, str] = field(default_factory=dict)
    cleanup: Callable[[], None] = lambda: None


def _with_fast_retry(store: Store) -> Store:
    store.retry_policy = FAST_RETRY
    return store


def local_case() -> BackendCase:
    base = Path(tempfile.mkdtemp(prefix="objstore-local-"))

    def make() -> Store:
        root = base / unique_bucket()
        root.mkdir()
        return open_store(f"file://{root}")

    return BackendCase(
        "local",
        make,
        lambda: open_store(f"file://{base}/missing-{unique_bucket()}"),
        server_gaps={
            "credentials": "local files have no credentials (permission errors: test_local.py)",
            "transient": "no network transport to inject 503s into",
        },
        cleanup=lambda: shutil.rmtree(base, ignore_errors=True),
    )


def s3_case(server, proxy) -> BackendCase:
    def config(secret: str | None = None) -> Config:
        table = server.profile(endpoint=proxy.endpoint, connect_timeout=3.0, read_timeout=30.0)
        if secret is not None:
            table["secret_access_key"] = secret
        return Config.from_mapping({"profiles": {"test": table}}, env={})

    def make() -> Store:
        bucket = unique_bucket()
        server.create_bucket(bucket)
        return _with_fast_retry(open_store(f"s3://test@{bucket}/", config()))

    def bad_credentials() -> Store:
        bucket = unique_bucket()
        server.create_bucket(bucket)
        return open_store(f"s3://test@{bucket}/", config("wrongSecretKey0000000000000000"))

    return BackendCase(
        "s3",
        make,
        lambda: open_store(f"s3://test@{unique_bucket('missing')}/", config()),
        bad_credentials,
        lambda n: proxy.inject(n),
        server_gaps={
            "if_match": "rclone serve s3 ignores If-Match on GET (runs on s3-moto)",
            "replace_part": "rclone serve s3 cannot replace an uploaded part (runs on s3-moto)",
            "part_copy": "rclone serve s3 answers UploadPartCopy without an ETag (runs on s3-moto)",
        },
    )


def s3_moto_case(server) -> BackendCase:
    config = Config.from_mapping({"profiles": {"moto": server.profile()}}, env={})

    def make() -> Store:
        bucket = unique_bucket()
        server.create_bucket(bucket)
        return _with_fast_retry(open_store(f"s3://moto@{bucket}/", config))

    return BackendCase(
        "s3-moto",
        make,
        lambda: open_store(f"s3://moto@{unique_bucket('missing')}/", config),
        server_gaps={
            "stat_checksum": "moto does not return the CRC-64/NVME of a single PUT on HEAD",
            "credentials": "moto does not check signatures (wrong credentials run on s3/rclone)",
            "transient": "503 injection runs on s3/rclone through the fault proxy",
            "aborted_upload": "moto answers 500, not NoSuchUpload, for an aborted upload id",
            "part_copy_if_match": "moto ignores CopySourceIfMatch on UploadPartCopy",
        },
    )


def oss_case(server) -> BackendCase:
    def config(secret: str | None = None) -> Config:
        table = {
            "endpoint": server.endpoint,
            "access_key_id": server.access_key_id,
            "secret_access_key": secret or server.access_key_secret,
            "connect_timeout": 3.0,
            "read_timeout": 30.0,
        }
        return Config.from_mapping({"profiles": {"test": table}}, env={})

    def make() -> Store:
        bucket = unique_bucket()
        server.create_bucket(bucket)
        return _with_fast_retry(open_store(f"oss://test@{bucket}/", config()))

    def bad_credentials() -> Store:
        bucket = unique_bucket()
        server.create_bucket(bucket)
        return open_store(f"oss://test@{bucket}/", config("wrongSecretKey0000000000000000"))

    return BackendCase(
        "oss",
        make,
        lambda: open_store(f"oss://test@{unique_bucket('missing')}/", config()),
        bad_credentials,
        lambda n: server.inject_errors(n, 503, "ServiceUnavailable"),
    )


def fsspec_memory_case() -> BackendCase:
    fs = fsspec.filesystem("memory")

    def make() -> Store:
        bucket = unique_bucket()
        fs.mkdir(f"/{bucket}")
        return open_store(f"memory://{bucket}/", Config.from_mapping({}, env={}))

    return BackendCase(
        "fsspec-memory",
        make,
        lambda: open_store(
            f"memory://{unique_bucket('missing')}/", Config.from_mapping({}, env={})
        ),
        server_gaps={
            "credentials": "fsspec's memory filesystem has no credentials",
            "transient": "no network transport to inject 503s into",
        },
    )
