"""The FUSE operations of ``pcache mount``: a thin :class:`pyfuse3.Operations` over the client.

A mount shows ``NAMESPACE/PREFIX`` as a directory tree: keys are split at ``/``, directories are
implicit (a directory exists while some key lies under it, or while this mount remembers it:
``mkdir``, or a directory whose last file was removed here, so ``rm -r`` works). Reads go through
a :class:`~pcache.client.PcacheReader` pinned to the version seen at ``open`` (block reads with
readahead); writes are sequential appends into a :class:`~pcache.client.PcacheWriter`
(write-back through the local worker), committed remote-durable on ``close``/``fsync``.

Threading: every handler runs in the trio task of pyfuse3; all mount state (inode table, handles,
remembered directories) is touched only there. Blocking client calls run in worker threads
through one :class:`trio.CapacityLimiter`. Every handler goes through :func:`fuse_errors`, the one
place where exceptions become errno values; nothing but :class:`pyfuse3.FUSEError` reaches pyfuse3.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from objstore.base import ObjectInfo
from objstore.errors import (
    EndpointUnreachable,
    InsufficientStorage,
    InvalidKey,
    NotSupported,
    PreconditionFailed,
    TransientError,
)

from .client import PcacheClient, PcacheReader, PcacheWriter
from .mount_stats import CONTROL_NAME, MountStats

log = logging.getLogger(__name__)

FILE, DIR, CONTROL = "file", "dir", "control"
CONTROL_INODE = pyfuse3.ROOT_INODE + 1  # the hidden statistics file at the mount root
COPY_CHUNK = 8 << 20
WRITE_CHUNK = 8 << 20  # FUSE writes (128 KiB-1 MiB) are gathered into pieces this large
NAME_MAX = 255
INLINE_READ_MAX = 64 << 10  # reads up to this size may be served in the event loop itself
T = TypeVar("T")
P = ParamSpec("P")


# -- errors ----------------------------------------------------------------------------------------


def errno_for(exc: BaseException, where: str) -> int:
    """The errno a failed handler answers with; logs what a user would need to see."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    if isinstance(exc, FileNotFoundError):
        return errno.ENOENT
    if isinstance(exc, PermissionError):
        return errno.EACCES
    if isinstance(exc, InvalidKey):
        log.info("%s: %s", where, exc)
        return errno.EINVAL
    if isinstance(exc, InsufficientStorage) or (
        isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    ):
        log.warning("%s: out of space: %s", where, exc)
        return errno.ENOSPC
    if isinstance(exc, PreconditionFailed):  # the object changed under an open file
        log.info("%s: %s", where, exc)
        return errno.ESTALE
    if isinstance(exc, NotSupported):
        return errno.EOPNOTSUPP
    if isinstance(exc, EndpointUnreachable | TransientError | TimeoutError):
        log.warning("%s: worker unreachable or timing out: %s", where, exc)
        return errno.EIO
    log.error("%s failed", where, exc_info=exc)
    return errno.EIO


def fuse_errors(
    func: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Wrap a handler so that any exception leaves it as a :class:`pyfuse3.FUSEError`; the
    call, its latency and its errno are counted in the operations' :class:`MountStats`."""
    name = func.__name__

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        stats: MountStats | None = getattr(args[0], "stats", None) if args else None
        started = time.perf_counter()
        error: str | None = None
        try:
            return await func(*args, **kwargs)
        except pyfuse3.FUSEError as exc:
            error = errno.errorcode.get(exc.errno, str(exc.errno))
            raise
        except Exception as exc:
            code = errno_for(exc, name)
            error = errno.errorcode.get(code, str(code))
            raise pyfuse3.FUSEError(code) from None
        finally:
            if stats is not None:
                stats.record(name, time.perf_counter() - started, error)

    return wrapper


def fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


# -- inodes and handles ----------------------------------------------------------------------------


@dataclass
class _Node:
    path: str
    kind: str
    lookups: int = 0


class InodeTable:
    """Paths (relative to the mount root, ``""`` for the root) <-> inode numbers.

    An inode lives while the kernel holds lookups on it (``forget`` drops them) or a handle is
    open; numbers are never reused within a mount.
    """

    def __init__(self) -> None:
        self._nodes: dict[int, _Node] = {
            pyfuse3.ROOT_INODE: _Node("", DIR, 1),
            CONTROL_INODE: _Node(CONTROL_NAME, CONTROL, 1),
        }
        self._by_path: dict[str, int] = {"": pyfuse3.ROOT_INODE}
        self._next = CONTROL_INODE + 1

    def __len__(self) -> int:
        return len(self._nodes)

    def node(self, inode: int) -> _Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise fail(errno.ENOENT) from None

    def inode(self, path: str, kind: str) -> int:
        """The inode of ``path``, allocated when new; its kind is updated."""
        inode = self._by_path.get(path)
        if inode is None:
            inode = self._next
            self._next += 1
            self._nodes[inode] = _Node(path, kind)
            self._by_path[path] = inode
        else:
            self._nodes[inode].kind = kind
        return inode

    def find(self, path: str) -> int | None:
        return self._by_path.get(path)

    def remember(self, inode: int) -> None:
        self._nodes[inode].lookups += 1

    def forget(self, inode: int, count: int, busy: bool = False) -> None:
        node = self._nodes.get(inode)
        if node is None or inode in (pyfuse3.ROOT_INODE, CONTROL_INODE):
            return
        node.lookups = max(0, node.lookups - count)
        if node.lookups == 0 and not busy:
            del self._nodes[inode]
            if self._by_path.get(node.path) == inode:
                del self._by_path[node.path]

    def unlink(self, path: str) -> None:
        """``path`` is gone; its inode (if the kernel still holds it) keeps its number."""
        self._by_path.pop(path, None)

    def move(self, old: str, new: str) -> None:
        inode = self._by_path.pop(old, None)
        if inode is not None:
            self._nodes[inode].path = new
            self._by_path[new] = inode


@dataclass
class _ReadHandle:
    inode: int
    reader: PcacheReader
    lock: threading.Lock = field(default_factory=threading.Lock)

    def pread(self, offset: int, size: int) -> bytes:
        # bytes on this node's disks need no lock: the kernel's concurrent readahead requests
        # are then served in parallel
        data = self.reader.read_cached(offset, size)
        if data is not None:
            return data
        with self.lock:  # the reader keeps a position; the kernel may send reads concurrently
            self.reader.seek(offset)
            return self.reader.read(size) or b""

    def pread_cached(self, offset: int, size: int) -> bytes | None:
        """:meth:`pread` when the bytes are on this node's disks (or in hand); None otherwise,
        also when another read holds the reader."""
        if not self.lock.acquire(blocking=False):
            return None
        try:
            return self.reader.read_cached(offset, size)
        finally:
            self.lock.release()


@dataclass
class _WriteHandle:
    inode: int
    path: str
    writer: PcacheWriter
    size: int = 0
    mtime: float = field(default_factory=time.time)
    committed: ObjectInfo | None = None
    failed: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)
    pending: bytearray = field(default_factory=bytearray)  # not yet handed to the writer

    def feed(self, data: bytes | bytearray) -> None:
        """Hand ``data`` to the writer (runs in a worker thread)."""
        self.writer.write(data)


@dataclass
class _DirHandle:
    inode: int
    entries: list[tuple[str, str, ObjectInfo | None]]


@dataclass
class _ControlHandle:
    content: bytes  # the statistics as of open
    inode: int = CONTROL_INODE


Handle = _ReadHandle | _WriteHandle | _DirHandle | _ControlHandle


# -- operations ------------------------------------------------------------------------------------


class PcacheOperations(pyfuse3.Operations):
    """The handlers of one mount of ``namespace/prefix``.

    Args:
        client: the client of the node's worker (shared by all handler threads).
        namespace: the worker namespace shown at the mount root.
        prefix: key prefix shown at the root (``""`` or ending with ``/``).
        read_only: refuse every change with ``EROFS``.
        immutable: objects never change: long kernel cache timeouts and ``keep_cache``.
        threads: blocking client calls in flight at once.
        mountpoint: shown in the statistics.
        uid, gid: the owner every file and directory shows (default: the mount's process);
            with ``default_permissions`` the kernel checks access against it.

    The root also holds a hidden, read-only control file (:data:`CONTROL_NAME`, not listed)
    whose content is the mount's live statistics as JSON; it hides an object of that name.
    """

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(
        self,
        client: PcacheClient,
        namespace: str,
        prefix: str = "",
        *,
        read_only: bool = False,
        immutable: bool = False,
        threads: int = 32,
        mountpoint: str = "",
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        super().__init__()
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.client = client
        self.namespace = namespace
        self.prefix = prefix
        self.read_only = read_only
        self.immutable = immutable
        self.timeout = 24 * 3600.0 if immutable else 1.0
        self.dir_ttl = float("inf") if immutable else 5.0
        self.block_size = client.block_size
        self.inodes = InodeTable()
        self._limiter = trio.CapacityLimiter(threads)
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._writing: dict[str, _WriteHandle] = {}
        self._reads_in_flight = 0  # reads handed to worker threads
        self._local_dirs: set[str] = set()  # mkdir'd or emptied here: exist until rmdir
        self._known_dirs: dict[str, float] = {}  # path -> expiry (seen with content)
        self._started = time.time()
        self._uid = os.getuid() if uid is None else uid
        self._gid = os.getgid() if gid is None else gid
        self.stats = MountStats(f"{namespace}/{prefix}".rstrip("/"), mountpoint)

    # -- helpers ---------------------------------------------------------------------------

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(functools.partial(func, *args), limiter=self._limiter)

    def _key(self, path: str) -> str:
        return self.prefix + path

    def _client_path(self, path: str) -> str:
        return f"{self.namespace}/{self._key(path)}"

    def _dir_client_path(self, path: str) -> str:
        key = self._key(path)
        return f"{self.namespace}/{key}/" if path else f"{self.namespace}/{key}"

    def _child(self, parent_inode: int, name: bytes) -> str:
        node = self.inodes.node(parent_inode)
        if node.kind != DIR:
            raise fail(errno.ENOTDIR)
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            raise fail(errno.EINVAL) from None  # object keys are UTF-8
        if not text or "/" in text or "\x00" in text or len(name) > NAME_MAX:
            raise fail(errno.EINVAL)
        if parent_inode == pyfuse3.ROOT_INODE and text == CONTROL_NAME:
            raise fail(errno.EPERM)  # the control file is not created, removed or renamed
        return f"{node.path}/{text}" if node.path else text

    def _alloc_fh(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def _attrs(self, inode: int, kind: str, size: int = 0, mtime: float | None = None) -> Any:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.generation = 0
        attrs.entry_timeout = self.timeout
        attrs.attr_timeout = self.timeout
        write_bits = 0 if self.read_only else 0o200
        if kind == DIR:
            attrs.st_mode = stat.S_IFDIR | 0o555 | write_bits
            attrs.st_nlink = 2
            attrs.st_size = 0
        elif kind == CONTROL:  # size 0, read with direct_io: always the content of the moment
            attrs.st_mode = stat.S_IFREG | 0o444
            attrs.st_nlink = 1
            attrs.st_size = 0
            attrs.entry_timeout = attrs.attr_timeout = 0
        else:
            attrs.st_mode = stat.S_IFREG | 0o444 | write_bits
            attrs.st_nlink = 1
            attrs.st_size = size
        attrs.st_uid, attrs.st_gid = self._uid, self._gid
        attrs.st_blksize = self.block_size
        attrs.st_blocks = -(-attrs.st_size // 512)
        ns = int((self._started if mtime is None else mtime) * 1e9)
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = ns
        return attrs

    def _file_attrs(self, inode: int, info: ObjectInfo) -> Any:
        return self._attrs(inode, FILE, info.size, info.mtime)

    def _writing_attrs(self, inode: int, handle: _WriteHandle) -> Any:
        if handle.committed is not None:
            return self._file_attrs(inode, handle.committed)
        return self._attrs(inode, FILE, handle.size, handle.mtime)

    def _dir_known_locally(self, path: str) -> bool:
        if path == "" or path in self._local_dirs:
            return True
        if self._known_dirs.get(path, 0.0) > time.monotonic():
            return True
        below = path + "/"
        return any(d.startswith(below) for d in self._local_dirs) or any(
            w.startswith(below) for w in self._writing
        )

    def _remember_dir(self, path: str) -> None:
        self._known_dirs[path] = time.monotonic() + self.dir_ttl

    def _keep_dir(self, path: str) -> None:
        """Keep ``path`` (and its parents) visible although it may have no content left."""
        while path:
            self._local_dirs.add(path)
            path = path.rpartition("/")[0]

    async def _listing(self, path: str) -> tuple[list[ObjectInfo], list[str]]:
        return await self._run(self.client.ls, self._dir_client_path(path))

    async def _has_content(self, path: str) -> bool:
        objects, prefixes = await self._listing(path)
        base = self._key(path) + "/" if path else self.prefix
        return bool(prefixes) or any(o.key != base for o in objects)

    async def _stat_file(self, path: str) -> ObjectInfo | None:
        try:
            return await self._run(self.client.stat, self._client_path(path))
        except FileNotFoundError:
            return None

    async def _resolve(self, path: str) -> tuple[str, ObjectInfo | None] | None:
        """What ``path`` is: (FILE, info), (DIR, None), or None when it does not exist."""
        if path in self._writing:
            return FILE, None
        if self._dir_known_locally(path):
            return DIR, None
        info = await self._stat_file(path)
        if info is not None:
            return FILE, info
        if await self._has_content(path):
            self._remember_dir(path)
            return DIR, None
        return None

    async def _entry(self, path: str) -> Any:
        resolved = await self._resolve(path)
        if resolved is None:
            raise fail(errno.ENOENT)
        kind, info = resolved
        inode = self.inodes.inode(path, kind)
        if kind == DIR:
            return self._attrs(inode, DIR)
        if info is None:
            return self._writing_attrs(inode, self._writing[path])
        return self._file_attrs(inode, info)

    def _check_writable(self) -> None:
        if self.read_only:
            raise fail(errno.EROFS)

    async def _invalidate_cluster(self, path: str) -> None:
        """Tell every node's metadata cache that ``path`` changed (best effort); the worker
        also drops the listings of its parent directories."""
        target = f"{self.namespace}/{self._key(path)}"
        try:
            await self._run(
                functools.partial(self.client.invalidate, cluster=True, blocks=False), target
            )
        except Exception as exc:
            log.warning("could not invalidate %s on the other nodes: %s", path, exc)

    # -- metadata handlers -----------------------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if name in (b".", b".."):
            path = self.inodes.node(parent_inode).path
            if name == b"..":
                path = path.rpartition("/")[0]
            attrs = self._attrs(self.inodes.inode(path, DIR), DIR)
        elif parent_inode == pyfuse3.ROOT_INODE and name == CONTROL_NAME.encode():
            attrs = self._attrs(CONTROL_INODE, CONTROL)
        else:
            attrs = await self._entry(self._child(parent_inode, name))
        self.inodes.remember(attrs.st_ino)
        return attrs

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            open_inodes = {h.inode for h in self._handles.values()}
            for inode, count in inode_list:
                self.inodes.forget(inode, count, busy=inode in open_inodes)
        except Exception:  # forget has no reply: an error here must not end the mount
            log.exception("forget failed")

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        node = self.inodes.node(inode)
        if node.kind in (DIR, CONTROL):
            return self._attrs(inode, node.kind)
        handle = self._writing.get(node.path)
        if handle is not None:
            return self._writing_attrs(inode, handle)
        info = await self._stat_file(node.path)
        if info is None:
            raise fail(errno.ENOENT)
        return self._file_attrs(inode, info)

    @fuse_errors
    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any = None
    ) -> Any:
        node = self.inodes.node(inode)
        if node.kind == CONTROL:
            raise fail(errno.EACCES)
        if fields.update_size:
            log.debug("setattr %s: size %d", node.path, attr.st_size)
            self._check_writable()
            if node.kind == DIR:
                raise fail(errno.EISDIR)
            handle = self._writing.get(node.path)
            if handle is not None:
                if attr.st_size != handle.size or handle.committed is not None:
                    raise fail(errno.EOPNOTSUPP)
            else:
                info = await self._stat_file(node.path)
                size = info.size if info is not None else 0
                if attr.st_size == 0 and size != 0:  # truncate(0): an empty object
                    await self._run(
                        functools.partial(self.client.put, durable="remote"),
                        self._client_path(node.path),
                        b"",
                    )
                    await self._invalidate_cluster(node.path)
                elif attr.st_size != size:
                    raise fail(errno.EOPNOTSUPP)  # objects are not resized in place
        # mode, owner and times are not stored: accepted and ignored (cp -p, touch work)
        return await self.getattr(inode, ctx)

    @fuse_errors
    async def statfs(self, ctx: Any = None) -> Any:
        status = await self._run(self.client.status)
        disks = [d for d in status.get("disks", []) if d.get("healthy", True)]
        capacity = sum(int(d["capacity"]) for d in disks)
        used = sum(int(d["used"]) + int(d.get("reserved", 0)) for d in disks)
        frsize = 4096
        result = pyfuse3.StatvfsData()
        result.f_bsize = self.block_size
        result.f_frsize = frsize
        result.f_blocks = capacity // frsize
        result.f_bfree = result.f_bavail = max(0, capacity - used) // frsize
        result.f_files = 1 << 32
        result.f_ffree = result.f_favail = 1 << 32
        result.f_namemax = NAME_MAX
        return result

    # -- directories -----------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        node = self.inodes.node(inode)
        if node.kind != DIR:
            raise fail(errno.ENOTDIR)
        path = node.path
        objects, prefixes = await self._listing(path)
        base = self._key(path) + "/" if path else self.prefix
        entries: dict[str, tuple[str, ObjectInfo | None]] = {}
        for info in objects:
            name = info.key[len(base) :]
            if self._valid_name(name):
                entries[name] = (FILE, info)
        for prefix in prefixes:
            name = prefix[len(base) :].rstrip("/")
            if self._valid_name(name):
                entries[name] = (DIR, None)  # a directory hides an object of the same name
        below = path + "/" if path else ""
        for local in self._local_dirs:
            if local.startswith(below) and "/" not in local[len(below) :]:
                entries.setdefault(local[len(below) :], (DIR, None))
        for writing in self._writing:
            if writing.startswith(below) and "/" not in writing[len(below) :]:
                entries.setdefault(writing[len(below) :], (FILE, None))
        for name, (kind, _) in entries.items():
            if kind == DIR:
                self._remember_dir(f"{below}{name}")
        listing = [(name, kind, info) for name, (kind, info) in sorted(entries.items())]
        return self._alloc_fh(_DirHandle(inode, listing))

    @staticmethod
    def _valid_name(name: str) -> bool:
        return (
            bool(name)
            and "/" not in name
            and name not in (".", "..")
            and len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX
        )

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        handle = self._handles.get(fh)
        if not isinstance(handle, _DirHandle):
            raise fail(errno.EBADF)
        base = self.inodes.node(handle.inode).path
        for index in range(start_id, len(handle.entries)):
            name, kind, info = handle.entries[index]
            path = f"{base}/{name}" if base else name
            inode = self.inodes.inode(path, kind)
            if kind == DIR:
                attrs = self._attrs(inode, DIR)
            elif info is not None:
                attrs = self._file_attrs(inode, info)
            elif path in self._writing:
                attrs = self._writing_attrs(inode, self._writing[path])
            else:
                attrs = self._attrs(inode, FILE)
            if not pyfuse3.readdir_reply(token, name.encode("utf-8"), attrs, index + 1):
                self.inodes.forget(inode, 0)  # drops it again when nobody holds it
                return
            self.inodes.remember(inode)

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any = None) -> Any:
        self._check_writable()
        path = self._child(parent_inode, name)
        if await self._resolve(path) is not None:
            raise fail(errno.EEXIST)
        self._keep_dir(path)
        inode = self.inodes.inode(path, DIR)
        self.inodes.remember(inode)
        return self._attrs(inode, DIR)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any = None) -> None:
        self._check_writable()
        path = self._child(parent_inode, name)
        resolved = await self._resolve(path)
        if resolved is None:
            raise fail(errno.ENOENT)
        if resolved[0] != DIR:
            raise fail(errno.ENOTDIR)
        below = path + "/"
        if (
            any(d.startswith(below) for d in self._local_dirs)
            or any(w.startswith(below) for w in self._writing)
            or await self._has_content(path)
        ):
            raise fail(errno.ENOTEMPTY)
        self._local_dirs.discard(path)
        self._known_dirs.pop(path, None)
        self._keep_dir(path.rpartition("/")[0])
        self.inodes.unlink(path)

    # -- removing and renaming files -------------------------------------------------------

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any = None) -> None:
        self._check_writable()
        path = self._child(parent_inode, name)
        if path in self._writing:
            raise fail(errno.EBUSY)
        info = await self._stat_file(path)
        if info is None:
            raise fail(errno.EISDIR if await self._resolve(path) else errno.ENOENT)
        await self._run(self.client.delete, self._client_path(path))
        await self._invalidate_cluster(path)
        self._keep_dir(path.rpartition("/")[0])  # the directory stays until rmdir
        self.inodes.unlink(path)

    @fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any = None,
    ) -> None:
        self._check_writable()
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise fail(errno.EINVAL)
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        if old in self._writing or new in self._writing:
            raise fail(errno.EBUSY)
        source = await self._resolve(old)
        if source is None:
            raise fail(errno.ENOENT)
        if source[0] == DIR:
            raise fail(errno.EXDEV)  # no directory renames: `mv` falls back to copy + delete
        if old == new:
            return
        target = await self._resolve(new)
        if target is not None:
            if target[0] == DIR:
                raise fail(errno.EISDIR)
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise fail(errno.EEXIST)
        await self._run(self._copy, self._client_path(old), self._client_path(new))
        await self._run(self.client.delete, self._client_path(old))
        await self._invalidate_cluster(new)
        if old.rpartition("/")[0] != new.rpartition("/")[0]:
            await self._invalidate_cluster(old)
        self._keep_dir(old.rpartition("/")[0])
        self.inodes.unlink(new)
        self.inodes.move(old, new)

    def _copy(self, source: str, target: str) -> None:
        """Copy one object through the cache (in a worker thread)."""
        with PcacheReader(self.client, source) as reader:
            writer = PcacheWriter(self.client, target, durable="remote")
            try:
                while chunk := reader.read(COPY_CHUNK):
                    writer.write(chunk)
            except BaseException:
                writer.abort()
                raise
            writer.close()

    # -- reads -----------------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any = None) -> Any:
        node = self.inodes.node(inode)
        if node.kind == DIR:
            raise fail(errno.EISDIR)
        if node.kind == CONTROL:
            return self._open_control(flags)
        if flags & os.O_ACCMODE == os.O_RDONLY:
            reader = await self._run(PcacheReader, self.client, self._client_path(node.path))
            info = pyfuse3.FileInfo()
            info.fh = self._alloc_fh(_ReadHandle(inode, reader))
            info.keep_cache = self.immutable
            info.direct_io = False
            return info
        self._check_writable()
        if not flags & os.O_TRUNC:
            # appending to or patching an object would mean rewriting it: refuse unless empty
            current = await self._stat_file(node.path)
            if current is not None and current.size > 0:
                raise fail(errno.EOPNOTSUPP)
        return await self._open_writer(inode, node.path)

    def _open_control(self, flags: int) -> Any:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise fail(errno.EACCES)
        content = self.stats.render(
            dict(self.client.sources),
            open_files=sum(
                isinstance(h, _ReadHandle | _WriteHandle) for h in self._handles.values()
            ),
            files_being_written=len(self._writing),
            inodes=len(self.inodes),
            read_only=self.read_only,
            immutable=self.immutable,
        )
        info = pyfuse3.FileInfo()
        info.fh = self._alloc_fh(_ControlHandle(content))
        info.direct_io = True  # the size is 0: reads must reach us, not the page cache
        info.keep_cache = False
        return info

    async def _open_writer(self, inode: int, path: str) -> Any:
        if path in self._writing:
            raise fail(errno.EBUSY)  # one writer per file and mount
        placeholder = _WriteHandle(inode, path, writer=None)  # type: ignore[arg-type]
        self._writing[path] = placeholder
        try:
            placeholder.writer = await self._run(
                functools.partial(PcacheWriter, durable="remote"),
                self.client,
                self._client_path(path),
            )
        except BaseException:
            del self._writing[path]
            raise
        info = pyfuse3.FileInfo()
        info.fh = self._alloc_fh(placeholder)
        info.keep_cache = False
        info.direct_io = False
        return info

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles.get(fh)
        if isinstance(handle, _ControlHandle):
            return handle.content[off : off + size]
        if not isinstance(handle, _ReadHandle):
            raise fail(errno.EBADF)  # a write handle: the object does not exist until commit
        data = None
        if size <= INLINE_READ_MAX and not self._reads_in_flight:
            # a small read while nothing else is reading: a hit on this node's disks is served
            # right here, without the hop to a worker thread and back (which costs more than
            # the disk read blocks the loop); large reads keep overlapping in threads
            data = handle.pread_cached(off, size)
        if data is None:
            self._reads_in_flight += 1
            try:
                data = await self._run(handle.pread, off, size)
            finally:
                self._reads_in_flight -= 1
        self.stats.read(size, len(data))
        return data

    # -- writes ----------------------------------------------------------------------------

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any = None
    ) -> tuple[Any, Any]:
        self._check_writable()
        path = self._child(parent_inode, name)
        if self._dir_known_locally(path):
            raise fail(errno.EISDIR)
        inode = self.inodes.inode(path, FILE)
        info = await self._open_writer(inode, path)
        self.inodes.remember(inode)
        return info, self._writing_attrs(inode, self._writing[path])

    def _write_handle(self, fh: int) -> _WriteHandle:
        handle = self._handles.get(fh)
        if not isinstance(handle, _WriteHandle):
            raise fail(errno.EBADF)
        return handle

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._write_handle(fh)
        async with handle.lock:
            if handle.failed:
                raise fail(errno.EIO)
            if off != handle.size:
                log.info(
                    "%s: write at %d, expected %d: not sequential", handle.path, off, handle.size
                )
                raise fail(errno.EOPNOTSUPP)
            if handle.committed is not None:
                await self._reopen(handle)
            handle.pending += buf
            if len(handle.pending) >= WRITE_CHUNK:
                data, handle.pending = handle.pending, bytearray()
                try:
                    await self._run(handle.feed, data)
                except BaseException:
                    await self._abort(handle)
                    raise
            handle.size += len(buf)
            handle.mtime = time.time()
            self.stats.wrote(len(buf))
            return len(buf)

    async def _reopen(self, handle: _WriteHandle) -> None:
        """More writes after a commit (a dup'd or inherited descriptor was closed): start a new
        session holding what was committed, so the next commit has the whole file."""
        path = self._client_path(handle.path)

        def reopen() -> None:
            handle.writer = PcacheWriter(self.client, path, durable="remote")
            try:
                with PcacheReader(self.client, path) as reader:
                    while chunk := reader.read(COPY_CHUNK):
                        handle.feed(chunk)
                if handle.writer.tell() != handle.size:
                    raise pyfuse3.FUSEError(errno.ESTALE)  # replaced by someone meanwhile
            except BaseException:
                handle.writer.abort()
                raise

        await self._run(reopen)
        handle.committed = None

    async def _commit(self, handle: _WriteHandle) -> None:
        if handle.failed:
            raise fail(errno.EIO)
        if handle.committed is not None:
            return
        data, handle.pending = handle.pending, bytearray()

        def commit() -> ObjectInfo:
            handle.feed(data)
            return handle.writer.commit("remote")

        try:
            handle.committed = await self._run(commit)
        except BaseException:
            await self._abort(handle)
            raise
        await self._invalidate_cluster(handle.path)

    async def _abort(self, handle: _WriteHandle) -> None:
        """Give up a failed write: nothing partial is ever committed."""
        handle.failed = True
        if handle.writer is None or handle.writer.closed:
            return
        try:
            await self._run(handle.writer.abort)
        except Exception as exc:
            log.info("abort of %s failed: %s", handle.path, exc)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        handle = self._handles.get(fh)
        if not isinstance(handle, _WriteHandle):
            return
        # close(2) waits for FLUSH but not for RELEASE: committing here is what makes the
        # object visible (and its errors reported) when close returns
        async with handle.lock:
            await self._commit(handle)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handles.get(fh)
        if isinstance(handle, _WriteHandle):
            async with handle.lock:
                await self._commit(handle)

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, _ReadHandle):
            await self._run(handle.reader.close)
        elif isinstance(handle, _WriteHandle):
            try:
                async with handle.lock:
                    if handle.failed:
                        await self._abort(handle)
                    else:
                        await self._commit(handle)
            finally:
                if self._writing.get(handle.path) is handle:
                    del self._writing[handle.path]

    # -- shutdown --------------------------------------------------------------------------

    def abort_writes(self) -> None:
        """Drop uncommitted writes (the mount is going away); called outside trio."""
        for handle in list(self._writing.values()):
            if handle.committed is None and handle.writer is not None:
                log.warning("unmounted while %s was being written: discarded", handle.path)
                try:
                    handle.writer.abort()
                except Exception as exc:
                    log.info("abort of %s failed: %s", handle.path, exc)
        self._writing.clear()
