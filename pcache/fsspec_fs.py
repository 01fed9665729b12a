"""``pcache://`` for fsspec: ``fsspec.open("pcache://datasets/tokens/shard-0.bin")``.

Registered by entry point (``fsspec.specs``), so any fsspec user (pandas, datasets, torch's
``FileSystemReader`` over fsspec) reads through the node cache. Paths are ``NAMESPACE/KEY``;
directories are implicit (object-store prefixes): ``mkdir`` is a no-op and a directory exists
while something is under it.
"""

from __future__ import annotations

import logging
from typing import Any

from fsspec.spec import AbstractFileSystem

from objstore.base import ObjectInfo

from .client import PcacheClient, split_path
from .config import ClientConfig

log = logging.getLogger(__name__)


class PcacheFileSystem(AbstractFileSystem):  # type: ignore[misc]  # fsspec is untyped
    """fsspec filesystem over :class:`~pcache.client.PcacheClient`.

    Args:
        worker: the local worker's URL (default: ``$PCACHE_WORKER`` or the config).
        config: path of the TOML file with the ``[pcache]`` table.
        client: an existing client to share.
    """

    protocol = "pcache"
    root_marker = ""
    cachable = True

    def __init__(
        self,
        worker: str | None = None,
        config: str | None = None,
        client: PcacheClient | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if client is None:
            client_config = ClientConfig.load(config)
            if worker:
                import dataclasses

                client_config = dataclasses.replace(client_config, worker=worker)
            client = PcacheClient(client_config)
        self.client = client

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith("pcache://"):
            path = path[len("pcache://") :]
        return path.strip("/")

    # -- metadata ------------------------------------------------------------------------------

    def _file_entry(self, namespace: str, info: ObjectInfo) -> dict[str, Any]:
        return {
            "name": f"{namespace}/{info.key}",
            "size": info.size,
            "type": "file",
            "mtime": info.mtime,
            "etag": info.etag,
        }

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        if not path:
            entries = [
                {"name": ns, "size": 0, "type": "directory"}
                for ns in self.client.info()["namespaces"]
            ]
        else:
            namespace, key = split_path(path)
            objects, prefixes = self.client.ls(path)
            entries = [
                {"name": f"{namespace}/{p.rstrip('/')}", "size": 0, "type": "directory"}
                for p in prefixes
            ]
            entries += [self._file_entry(namespace, o) for o in objects]
            if not entries and key:
                entries = [self.info(path)]  # a file, or FileNotFoundError
        entries.sort(key=lambda e: e["name"])
        return entries if detail else [e["name"] for e in entries]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        if not path:
            return {"name": "", "size": 0, "type": "directory"}
        namespace, key = split_path(path)
        if not key:
            if namespace in self.client.info()["namespaces"]:
                return {"name": namespace, "size": 0, "type": "directory"}
            raise FileNotFoundError(path)
        try:
            return self._file_entry(namespace, self.client.stat(path))
        except FileNotFoundError:
            pass
        objects, prefixes = self.client.ls(path)
        if objects or prefixes:
            return {"name": path, "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    def modified(self, path: str) -> Any:
        import datetime

        return datetime.datetime.fromtimestamp(self.info(path)["mtime"], datetime.UTC)

    created = modified

    # -- data ----------------------------------------------------------------------------------

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        path = self._strip_protocol(path)
        info = self.client.stat(path)
        start = 0 if start is None else (start if start >= 0 else max(0, info.size + start))
        stop = info.size if end is None else (end if end >= 0 else max(0, info.size + end))
        stop = min(stop, info.size)
        if stop <= start:
            return b""
        buf = bytearray(stop - start)
        n = self.client.readinto(path, start, buf, info)
        return bytes(buf[:n])

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        if mode == "create" and self.exists(path):
            raise FileExistsError(path)
        self.client.put(path, value)
        self.invalidate_cache(self._parent(path))

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        if mode == "xb":
            if self.exists(path):
                raise FileExistsError(path)
            mode = "wb"
        if mode not in ("rb", "wb"):
            raise ValueError(f"pcache:// supports modes rb, wb and xb, not {mode!r}")
        return self.client.open(path, mode)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        src, dst = self._strip_protocol(path1), self._strip_protocol(path2)
        with self.client.open(src, "rb") as reader, self.client.open(dst, "wb") as writer:
            while chunk := reader.read(32 << 20):
                writer.write(chunk)

    def rm_file(self, path: str) -> None:
        self.client.delete(self._strip_protocol(path))

    def _rm(self, path: str) -> None:
        if self.isfile(path):
            self.rm_file(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        for p in reversed(self.expand_path(path, recursive=recursive, maxdepth=maxdepth)):
            if self.isfile(p):
                self.rm_file(p)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        pass  # directories are implicit prefixes

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        pass

    def rmdir(self, path: str) -> None:
        pass
