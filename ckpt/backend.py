"""Where checkpoint files go: any objstore URL, or the node's pcache workers.

:func:`open_backend` turns a checkpoint URL into a :class:`Backend` rooted at the checkpoint's
directory. ``pcache://NAMESPACE/PREFIX`` goes through the local pcache worker (writes staged on
its disks and uploaded by it, large reads through shared memory); every other URL
(``s3://``, ``oss://``, ``file://``, a plain path, any fsspec URL) is an objstore store. A
file is written by :meth:`Backend.open_write` as a stream: parts are uploaded as they fill, so
memory stays bounded whatever the file's size, and the file appears only on ``commit``.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from objstore import Store, open_store, parse_url
from objstore.base import PartInfo
from objstore.errors import BucketNotFound, ObjectNotFound

log = logging.getLogger(__name__)

PCACHE_SCHEME = "pcache://"
DEFAULT_PART_SIZE = 8 * 1024 * 1024  # with two in flight: 24 MiB of memory per stream


class FileStream(ABC):
    """A file being written: ``write`` any number of times, then ``commit`` or ``abort``."""

    @abstractmethod
    def write(self, data: Any) -> None: ...

    @abstractmethod
    def commit(self) -> None:
        """Make the file visible with everything written (durable before it returns)."""

    @abstractmethod
    def abort(self) -> None:
        """Drop what was written; the file does not appear."""


class Backend(ABC):
    """The files of one checkpoint directory. Thread-safe."""

    url: str

    @abstractmethod
    def open_write(self, name: str) -> FileStream: ...

    @abstractmethod
    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of ``name``.

        Raises:
            FileNotFoundError: no such file.
        """

    @abstractmethod
    def read(self, name: str) -> bytes: ...

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(name, size) of every file under ``prefix`` (recursive), names relative to the root."""

    def put(self, name: str, data: bytes) -> None:
        stream = self.open_write(name)
        try:
            stream.write(data)
        except BaseException:
            stream.abort()
            raise
        stream.commit()

    def close(self) -> None:  # noqa: B027 - optional
        pass


# -- objstore ------------------------------------------------------------------------------------


class _MultipartStream(FileStream):
    """Parts of ``part_size`` uploaded in the background, at most ``max_pending`` at once (the
    memory bound); a small file is one PUT at commit."""

    def __init__(self, store: Store, key: str, part_size: int, pool: ThreadPoolExecutor) -> None:
        self._store, self._key, self._pool = store, key, pool
        self._part_size = max(part_size, store.features.min_part_size)
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[Future[PartInfo]] = []
        self._slots = threading.BoundedSemaphore(2)  # parts in flight: 2 x part size of memory

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            room = self._part_size - len(self._buf)
            self._buf += view[:room]
            view = view[room:]
            if len(self._buf) >= self._part_size:
                part, self._buf = self._buf, bytearray()  # handed over, not copied
                self._send(part)

    def _send(self, part: bytearray) -> None:
        if self._upload_id is None:
            self._upload_id = self._store.create_upload(self._key)
        number = len(self._parts) + 1
        self._slots.acquire()

        def upload() -> PartInfo:
            try:
                assert self._upload_id is not None
                return self._store.upload_part(self._key, self._upload_id, number, part)
            finally:
                self._slots.release()

        self._parts.append(self._pool.submit(upload))

    def commit(self) -> None:
        if self._upload_id is None:
            self._store.put(self._key, bytes(self._buf))
            return
        try:
            if self._buf:
                part, self._buf = self._buf, bytearray()
                self._send(part)
            parts = [f.result() for f in self._parts]
            self._store.complete_upload(self._key, self._upload_id, parts)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for f in self._parts:
            f.cancel()
        if self._upload_id is not None:
            try:
                self._store.abort_upload(self._key, self._upload_id)
            except Exception as exc:  # the original failure matters more
                log.warning("could not abort the upload of %s: %s", self._key, exc)
            self._upload_id = None


class StoreBackend(Backend):
    """A checkpoint directory in an objstore store."""

    def __init__(self, url: str, store: Store, part_size: int = DEFAULT_PART_SIZE) -> None:
        self.url = url
        self.store = store
        self.part_size = part_size
        # a local directory that does not exist yet holds no checkpoint; a missing bucket is
        # a mistake worth its own error
        self._local = parse_url(url).scheme == "file"
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="ckpt-upload")

    def open_write(self, name: str) -> FileStream:
        return _MultipartStream(self.store, name, self.part_size, self._pool)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        try:
            return self.store.get_range(name, offset, length)
        except ObjectNotFound:
            raise FileNotFoundError(f"{self.url.rstrip('/')}/{name}: no such file") from None

    def read(self, name: str) -> bytes:
        try:
            return self.store.get(name)
        except ObjectNotFound:
            raise FileNotFoundError(f"{self.url.rstrip('/')}/{name}: no such file") from None

    def exists(self, name: str) -> bool:
        try:
            return self.store.exists(name)
        except BucketNotFound:
            if self._local:
                return False
            raise

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        try:
            for info in self.store.iter_list(prefix):
                yield info.key, info.size
        except BucketNotFound:
            if not self._local:
                raise

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.store.close()


# -- pcache --------------------------------------------------------------------------------------


class _PcacheStream(FileStream):
    def __init__(self, writer: Any, durable: str) -> None:
        self._writer, self._durable = writer, durable

    def write(self, data: Any) -> None:
        self._writer.write(data)

    def commit(self) -> None:
        self._writer.commit(durable=self._durable)

    def abort(self) -> None:
        self._writer.abort()


class PcacheBackend(Backend):
    """A checkpoint directory through the local pcache worker.

    Args:
        url: ``pcache://NAMESPACE/PREFIX``.
        durable: ``remote`` (default: a file is committed once it is in the backing store) or
            ``local`` (once it is on the worker's disks; the worker uploads it afterwards).
    """

    def __init__(self, url: str, client: Any = None, durable: str = "remote") -> None:
        from pcache.client import PcacheClient
        from pcache.config import ClientConfig

        path = url[len(PCACHE_SCHEME) :].strip("/")
        if not path:
            raise ValueError(f"{url!r}: expected pcache://NAMESPACE/PREFIX")
        self.url = url
        self.root = path + "/"
        self.durable = durable
        self._own = client is None
        self.client = client if client is not None else PcacheClient(ClientConfig.load())

    def _path(self, name: str) -> str:
        return self.root + name

    def open_write(self, name: str) -> FileStream:
        return _PcacheStream(self.client.open(self._path(name), "wb"), self.durable)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        from objstore.errors import ObjectNotFound as Missing

        buf = bytearray(length)
        try:
            n = self.client.readinto(self._path(name), offset, buf)
        except Missing:
            raise FileNotFoundError(f"{self.url.rstrip('/')}/{name}: no such file") from None
        return bytes(memoryview(buf)[:n])

    def read(self, name: str) -> bytes:
        from objstore.errors import ObjectNotFound as Missing

        try:
            return bytes(self.client.read(self._path(name)))
        except Missing:
            raise FileNotFoundError(f"{self.url.rstrip('/')}/{name}: no such file") from None

    def exists(self, name: str) -> bool:
        from objstore.errors import ObjectNotFound as Missing

        try:
            self.client.stat(self._path(name))
            return True
        except Missing:
            return False

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        files, _ = self.client.ls(self._path(prefix), recursive=True)
        namespace = self.root.split("/", 1)[0]
        inner = self.root[len(namespace) + 1 :]
        for info in files:
            yield info.key[len(inner) :], info.size

    def close(self) -> None:
        if self._own:
            self.client.close()


def open_backend(url: str, *, config: Any = None, **kwargs: Any) -> Backend:
    """The backend of a checkpoint URL.

    Raises:
        objstore.InvalidURL: a malformed URL.
        objstore.ConfigError: an unknown profile.
    """
    url = str(url)
    if url.startswith(PCACHE_SCHEME):
        return PcacheBackend(url, **kwargs)
    store = open_store(parse_url(url), config)
    return StoreBackend(url, store, **kwargs)


def is_supported_url(url: str) -> bool:
    """Whether :func:`open_backend` accepts ``url`` (without opening anything)."""
    if str(url).startswith(PCACHE_SCHEME):
        return len(str(url)) > len(PCACHE_SCHEME)
    try:
        parse_url(str(url))
    except Exception:
        return False
    return True
