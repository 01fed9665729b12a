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
    NameTooLong,
    NotSupported,
    PreconditionFailed,
    TransientError,
)

from .client import Listing, PcacheClient
from .config import Durability
from .files import PcacheReader
from .fuse_files import (
    SMALL_FILE_MAX,
    OpenFile,
    commit,
    copy_blocks,
    end_session,
    fill_from,
    make_room,
    open_staging,
)
from .fuse_names import NAMES_ONLY, name_only
from .mount_stats import CONTROL_NAME, MountStats
from .posix import (
    SYMLINK_MAX,
    XATTR_NAMESPACE,
    Attrs,
    Defaults,
    XattrError,
    attrs_of,
    check_xattr_name,
    foreign_of,
    keep_foreign,
    metadata_bytes,
    new_attrs,
    parse_xattrs,
    with_xattrs,
)
from .protocol import UploadFailed, is_pending
from .session import STRICT_TIMEOUT_S
from .statahead import StatAhead
from .transport import WorkerUnavailable

log = logging.getLogger(__name__)

FILE, DIR, CONTROL, LINK = "file", "dir", "control", "link"
CONTROL_INODE = pyfuse3.ROOT_INODE + 1  # the hidden statistics file at the mount root
NAME_MAX = 255
MAX_KEY_BYTES = 1024  # S3's limit (OSS: 1,023 — the worker checks the store's own)
INLINE_READ_MAX = 64 << 10  # reads up to this size may be served in the event loop itself
PAGE = 1000  # names asked of the worker per readdir page
PAGE_SPAN = 1 << 24  # offsets per page in a directory handle (a page holds fewer entries)
DOTS = 2  # "." and "..": the first two offsets of a directory
RECENT_MISSING_S = 1.0  # a rename trusts the kernel's lookup of its new name this long
CREATING_S = 2.0  # after a lookup found a name missing, new names in its directory are expected
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
    if isinstance(exc, NameTooLong):
        log.info("%s: %s", where, exc)
        return errno.ENAMETOOLONG
    if isinstance(exc, InvalidKey):
        log.info("%s: %s", where, exc)
        return errno.EINVAL
    if isinstance(exc, FileExistsError):
        return errno.EEXIST
    if isinstance(exc, UploadFailed):
        log.error("%s: %s", where, exc)
        return errno.EIO
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


def _bypasses_page_cache(flags: int) -> bool:
    """Whether an open with ``flags`` gets ``direct_io``: write-only ones. Written through the
    page cache, a file's pages carry the kernel's own mtime of each write; the first attributes
    the mount gives after it (a ``stat``, the lookup before a rename) have the writer's mtime,
    and the kernel (auto_inval_data, which pyfuse3 leaves on) then drops every cached page of
    the file under the inode lock: ~0.35 ms per MiB, 360 ms for a 1 GiB checkpoint before its
    ``os.replace``. A write-only descriptor cannot be mmapped or read, so nothing is lost by
    not caching what it writes (those pages were dropped at the next stat anyway)."""
    return flags & os.O_ACCMODE == os.O_WRONLY


# -- inodes and handles ----------------------------------------------------------------------------


@dataclass(slots=True)
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

    def number(self) -> int:
        """A number no inode has or will have: the ``d_ino`` of a name listed without one."""
        self._next += 1
        return self._next - 1

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
        """``old`` is now ``new``, and so is everything below it (a directory rename)."""
        below = old + "/"
        moved = [p for p in self._by_path if p == old or p.startswith(below)]
        for path in moved:
            inode = self._by_path.pop(path)
            target = new + path[len(old) :]
            self._nodes[inode].path = target
            self._by_path[target] = inode


@dataclass
class _ReadHandle:
    """A read-only descriptor of an object no writer on this mount has open."""

    inode: int
    path: str
    reader: PcacheReader
    lock: threading.Lock = field(default_factory=threading.Lock)

    def pread(self, offset: int, size: int) -> bytes:
        # bytes on this node's disks need no lock: the kernel's concurrent readahead requests
        # are then served in parallel
        data = self.reader.read_cached(offset, size)
        if data is not None:
            return data
        with self.lock:  # the reader keeps a position; the kernel may send reads concurrently
            return self.reader.read_at(offset, size)

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
class _FileHandle:
    """A descriptor of a path open for writing on this mount (or read while it is)."""

    inode: int
    file: OpenFile
    writable: bool
    append: bool = False


@dataclass
class _DirHandle:
    """An open directory, read page by page: ``starts[k]`` is the ``after`` token of page k
    (learned as pages are read, so any offset the kernel hands back can be resumed), and
    only the page in ``entries`` is held. ``.`` and ``..`` come first, at offsets 1 and 2; an
    entry's offset is ``k * PAGE_SPAN + index + DOTS + 1`` (the offset of the one after it
    is where a read resumes). ``extras``: names only this mount knows (directories
    it keeps, files being written) not yet met in a page; given after the last."""

    inode: int
    path: str
    starts: list[str]
    page: int
    entries: list[tuple[str, str, ObjectInfo | None, bool]]
    last: bool  # ``page`` is the listing's last
    extras: dict[str, str]


@dataclass
class _ControlHandle:
    content: bytes  # the statistics as of open
    inode: int = CONTROL_INODE


Handle = _ReadHandle | _FileHandle | _DirHandle | _ControlHandle


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
        uid, gid: the owner of objects that carry none (default: the mount's process); with
            ``default_permissions`` the kernel checks access against what each entry shows.
        durability: when ``close`` returns (see :class:`~pcache.config.Durability`).
        max_dir_rename: a directory with more keys than this is not renamed (``EXDEV``: ``mv``
            copies it instead).
        sync_timeout: seconds an ``fsync`` (or a remote-durable ``close``) waits for the store
            while it fails transiently; then ``EIO`` (the upload goes on in the background).

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
        durability: Durability = Durability.LOCAL,
        max_dir_rename: int = 10_000,
        sync_timeout: float = STRICT_TIMEOUT_S,
        negative_ttl: float = 0.0,
    ) -> None:
        super().__init__()
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.client = client
        self.namespace = namespace
        self.prefix = prefix
        self.read_only = read_only
        self.immutable = immutable
        self.durability = Durability(durability)
        self.max_dir_rename = max_dir_rename
        self.sync_timeout = sync_timeout
        self.negative_ttl = negative_ttl
        self.timeout = 24 * 3600.0 if immutable else 1.0
        self.dir_ttl = float("inf") if immutable else 5.0
        self.block_size = client.block_size
        # empty directories persist as "dir/" objects where the store keeps them as such
        info = client.info()
        self.markers = bool(info.get("directory_markers", {}).get(namespace, True))
        # the store's user-metadata limit, which POSIX attributes and xattrs share
        self.max_metadata = int(info.get("max_metadata_bytes", {}).get(namespace, 2048))
        self.inodes = InodeTable()
        self._limiter = trio.CapacityLimiter(threads)
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._open: dict[str, OpenFile] = {}  # path -> the file its writers share
        self._reads_in_flight = 0  # reads handed to worker threads
        self._local_dirs: set[str] = set()  # emptied here: exist until rmdir
        self._missing_at: dict[str, float] = {}  # names a lookup just found missing
        # what a lookup just found, and when (for the rename that follows it)
        self._found_at: dict[str, tuple[float, tuple[str, ObjectInfo | None]]] = {}
        # path -> (when, what it became): files committed here moments ago, answered for
        # RECENT_MISSING_S once closed (the lookup before their rename, a stat after close)
        self._committed: dict[str, tuple[float, ObjectInfo]] = {}
        self._missed_in: dict[
            str, float
        ] = {}  # directories where a lookup last found nothing, or made here
        self._known_dirs: dict[str, float] = {}  # path -> expiry (seen with content)
        self._dir_attrs: dict[str, tuple[Attrs, float]] = {}  # marker attributes, with expiry
        # directory -> the names it holds, as listed or made here, and until when that is trusted:
        # a lookup of a name not there is answered at once (no store round trip per new file);
        # kept only with a positive negative_ttl
        self._names: dict[str, tuple[set[str], float]] = {}
        # names readdir showed without attributes: their lookups are asked in batches
        self._statahead: StatAhead[ObjectInfo] = StatAhead(self.timeout)
        self._started = time.time()
        self.defaults = Defaults(
            os.getuid() if uid is None else uid, os.getgid() if gid is None else gid
        )
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

    def _marker(self, path: str) -> str:
        """The ``dir/`` marker object of a directory (``NS/KEY/``)."""
        return f"{self.namespace}/{self._key(path)}/"

    def _child(self, parent_inode: int, name: bytes) -> str:
        node = self.inodes.node(parent_inode)
        if node.kind != DIR:
            raise fail(errno.ENOTDIR)
        if len(name) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            raise fail(errno.EINVAL) from None  # object keys are UTF-8
        if not text or "/" in text or "\x00" in text:
            raise fail(errno.EINVAL)
        if parent_inode == pyfuse3.ROOT_INODE and text == CONTROL_NAME:
            raise fail(errno.EPERM)  # the control file is not created, removed or renamed
        path = f"{node.path}/{text}" if node.path else text
        # a directory's marker key ends in "/": it must fit the store too
        if len(self._key(path).encode()) + 1 > MAX_KEY_BYTES:
            raise fail(errno.ENAMETOOLONG)
        return path

    def _alloc_fh(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def _entry_attrs(
        self,
        inode: int,
        attrs: Attrs,
        size: int,
        *,
        trusted: bool = True,
        attrs_trusted: bool = True,
    ) -> Any:
        """``trusted``: the kernel may keep the name and the attributes for the timeout;
        ``attrs_trusted=False``: the name only (its next ``stat`` asks again)."""
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.generation = 0
        entry.entry_timeout = self.timeout if trusted else 0
        entry.attr_timeout = self.timeout if trusted and attrs_trusted else 0
        mode = attrs.mode
        if self.read_only:
            mode &= ~0o222
        entry.st_mode = mode
        entry.st_nlink = 2 if stat.S_ISDIR(mode) else 1
        entry.st_size = 0 if stat.S_ISDIR(mode) else size
        entry.st_uid, entry.st_gid = attrs.uid, attrs.gid
        entry.st_blksize = self.block_size
        entry.st_blocks = -(-entry.st_size // 512)
        entry.st_mtime_ns, entry.st_ctime_ns, entry.st_atime_ns = (
            attrs.mtime_ns,
            attrs.ctime_ns,
            attrs.atime_ns,
        )
        return entry

    def _default_dir_attrs(self) -> Attrs:
        ns = int(self._started * 1e9)
        return Attrs(
            stat.S_IFDIR | self.defaults.dir_mode, self.defaults.uid, self.defaults.gid, ns, ns, ns
        )

    async def _refresh_dir_attrs(self, path: str) -> None:
        """A directory's attributes once the kernel's copy lapsed: its marker is asked again
        (another node may have changed them)."""
        cached = self._dir_attrs.get(path)
        if not path or self.immutable or not self.markers:
            return
        if cached and cached[1] > time.monotonic():
            return
        marker = await self._marker_stat(path)
        attrs = (
            self._default_dir_attrs()  # no marker: a prefix, with the defaults
            if marker is None
            else attrs_of(marker, self.defaults, directory=True)
        )
        self._dir_attrs[path] = (attrs, time.monotonic() + self.timeout)

    def _dir_attrs_fresh(self, path: str) -> bool:
        cached = self._dir_attrs.get(path)
        return cached is not None and cached[1] > time.monotonic()

    def _dir_entry(self, inode: int, path: str) -> Any:
        """A directory's entry; attributes not (or no longer) known from its marker are not
        cached by the kernel, so its next ``stat`` asks (``getattr`` reads the marker)."""
        cached = self._dir_attrs.get(path)
        if cached and cached[1] > time.monotonic():
            return self._entry_attrs(inode, cached[0], 0)
        known = not path or self.immutable or not self.markers
        return self._entry_attrs(inode, self._default_dir_attrs(), 0, attrs_trusted=known)

    def _control_attrs(self) -> Any:
        ns = int(self._started * 1e9)
        entry = self._entry_attrs(
            CONTROL_INODE,
            Attrs(stat.S_IFREG | 0o444, self.defaults.uid, self.defaults.gid, ns, ns, ns),
            0,
        )
        entry.entry_timeout = entry.attr_timeout = 0  # read with direct_io: always fresh
        return entry

    def _object_entry(self, inode: int, info: ObjectInfo, *, trusted: bool = True) -> Any:
        return self._entry_attrs(inode, attrs_of(info, self.defaults), info.size, trusted=trusted)

    def _open_entry(self, inode: int, file: OpenFile) -> Any:
        return self._entry_attrs(inode, file.attrs, file.size)

    def _dir_known_locally(self, path: str) -> bool:
        if path == "" or path in self._local_dirs:
            return True
        if self._known_dirs.get(path, 0.0) > time.monotonic():
            return True
        below = path + "/"
        return any(d.startswith(below) for d in self._local_dirs) or any(
            w.startswith(below) for w in self._open
        )

    def _remember_dir(self, path: str) -> None:
        self._known_dirs[path] = time.monotonic() + self.dir_ttl

    def _forget_dir(self, path: str) -> None:
        self._local_dirs.discard(path)
        self._known_dirs.pop(path, None)
        self._dir_attrs.pop(path, None)

    def _keep_dir(self, path: str) -> None:
        """Keep ``path`` (and its parents) visible although it may have no content left."""
        while path:
            self._local_dirs.add(path)
            path = path.rpartition("/")[0]

    def _known_names(self, directory: str) -> set[str] | None:
        entry = self._names.get(directory)
        if entry is None or entry[1] <= time.monotonic():
            return None
        return entry[0]

    def _note_listing(self, directory: str, names: set[str]) -> None:
        # for negative_ttl: a name another writer adds is seen that much later at most
        if self.negative_ttl <= 0:
            return
        self._names[directory] = (names, time.monotonic() + self.negative_ttl)
        if len(self._names) > 4096:  # bounded: the oldest trust goes first
            oldest = min(self._names, key=lambda d: self._names[d][1])
            del self._names[oldest]

    def _note_added(self, path: str) -> None:
        self._committed.pop(path, None)
        self._missing_at.pop(path, None)
        self._found_at.pop(path, None)
        self._statahead.forget(path)
        parent, _, name = path.rpartition("/")
        names = self._known_names(parent)
        if names is not None:
            names.add(name)

    def _note_removed(self, path: str) -> None:
        self._committed.pop(path, None)
        self._found_at.pop(path, None)
        self._statahead.forget(path)
        parent, _, name = path.rpartition("/")
        names = self._known_names(parent)
        if names is not None:
            names.discard(name)
        below = path + "/"
        for directory in [d for d in self._names if d == path or d.startswith(below)]:
            del self._names[directory]

    async def _absent(self, path: str) -> bool:
        """Whether ``path`` is surely not there, from its directory's names (listed again when
        that is older than the directory TTL: one listing instead of a lookup per new name)."""
        if self.negative_ttl <= 0:
            return False
        parent, _, name = path.rpartition("/")
        names = self._known_names(parent)
        if names is None:
            if parent and not self._dir_known_locally(parent):
                return False
            listing = await self._listing(parent)
            base = self._key(parent) + "/" if parent else self.prefix
            names = {o.key[len(base) :] for o in listing.objects}
            names |= {p[len(base) :].rstrip("/") for p in listing.prefixes}
            names |= {w.rpartition("/")[2] for w in self._open if w.rpartition("/")[0] == parent}
            self._note_listing(parent, names)
        return name not in names

    async def _listing(self, path: str) -> Listing:
        return await self._run(self.client.list_dir, self._dir_client_path(path))

    async def _has_content(self, path: str) -> bool:
        """Whether a directory holds anything but its own marker (a probe, not a listing)."""
        if not path:
            listing = await self._listing(path)
            return bool(listing.prefixes or listing.objects)
        resolved = await self._run(
            functools.partial(self.client.resolve, file=False, marker=False),
            self._client_path(path),
        )
        return resolved.children

    async def _stat_object(self, client_path: str) -> ObjectInfo | None:
        try:
            return await self._run(
                functools.partial(self.client.stat, full=not self.immutable), client_path
            )
        except FileNotFoundError:
            return None

    async def _stat_file(self, path: str) -> ObjectInfo | None:
        return await self._stat_object(self._client_path(path))

    async def _ahead(self, path: str) -> tuple[bool, ObjectInfo | None]:
        """``path``'s stat from a stat-ahead batch (see :mod:`pcache.statahead`): asked now,
        with the names listed after it, when it is a listed name the kernel got without
        attributes (``dir/sub/``: a directory's marker); ``(False, None)`` when there is no
        such answer, ``(True, None)`` when the answer is "not there"."""
        known, info = self._statahead.take(path)
        if not known:
            batch = self._statahead.batch_for(path)
            if len(batch) < 2:
                return False, None
            paths = {self._client_path(p): p for p in batch}
            answers = await self._run(
                functools.partial(self.client.stat_many, full=True), list(paths)
            )
            self._statahead.answered(
                {paths[p]: a for p, a in answers.items() if paths[p] not in self._open}
            )
            known, info = self._statahead.take(path)
        return known, info

    async def _stat_ahead(self, path: str) -> ObjectInfo | None:
        """A file's stat from a stat-ahead batch; None when there is none (it is then asked
        alone: a name gone meanwhile may be a directory now)."""
        return (await self._ahead(path))[1]

    async def _marker_stat(self, path: str) -> ObjectInfo | None:
        """The marker object of directory ``path`` (None: it has none), from a stat-ahead
        batch when the directory was listed moments ago, else asked."""
        known, marker = await self._ahead(path + "/")
        if known:
            return marker
        return await self._stat_object(self._marker(path))

    async def _resolve(self, path: str) -> tuple[str, ObjectInfo | None] | None:
        """What ``path`` is: (FILE or LINK, info), (DIR, marker info or None), or None."""
        if path in self._open:
            return FILE, None
        committed = self._just_committed(path)
        if committed is not None:
            return (LINK if attrs_of(committed, self.defaults).is_symlink else FILE), committed
        if (
            not self.immutable
            and path not in self._local_dirs
            and not self._dir_known_locally(path)
            and await self._absent(path)
        ):
            return None
        known = self._dir_known_locally(path)
        want_marker = self.markers and not self.immutable
        if known:  # a directory: only its marker's attributes are asked
            marker = await self._marker_stat(path) if want_marker else None
            return self._found_dir(path, marker, asked=want_marker)
        # names created one after another in a directory (tar, cp -r) are new: the file is
        # asked with the rest (one round trip, not two); otherwise it is, most often, a file
        all_at_once = self._creating_in(path.rpartition("/")[0])
        if not all_at_once:
            ahead = await self._stat_ahead(path)
            if ahead is not None:
                return (LINK if attrs_of(ahead, self.defaults).is_symlink else FILE), ahead
            try:
                info = await self._stat_file(path)
            except WorkerUnavailable:  # the store itself is asked, for all of it at once
                all_at_once = True
            else:
                if info is not None:
                    return (LINK if attrs_of(info, self.defaults).is_symlink else FILE), info
        resolved = await self._run(
            functools.partial(
                self.client.resolve,
                file=all_at_once,
                marker=want_marker,
                full=not self.immutable,
            ),
            self._client_path(path),
        )
        if resolved.file is not None:
            kind = LINK if attrs_of(resolved.file, self.defaults).is_symlink else FILE
            return kind, resolved.file
        if not resolved.directory:
            return None
        self._remember_dir(path)
        return self._found_dir(path, resolved.marker, asked=want_marker)

    def _just_committed(self, path: str) -> ObjectInfo | None:
        """What ``path`` became when this mount committed it, less than RECENT_MISSING_S ago
        (within the kernel's own attribute window; changed or removed here since: None)."""
        committed = self._committed.get(path)
        if committed is None:
            return None
        if time.monotonic() - committed[0] >= RECENT_MISSING_S:
            del self._committed[path]
            return None
        return committed[1]

    def _found_dir(
        self, path: str, marker: ObjectInfo | None, *, asked: bool
    ) -> tuple[str, ObjectInfo | None]:
        """``path`` is a directory: its attributes come from its marker, else (when markers
        were asked and it has none) the defaults."""
        if marker is not None:
            self._dir_attrs[path] = (
                attrs_of(marker, self.defaults, directory=True),
                time.monotonic() + self.timeout,
            )
            self._remember_dir(path)
            return DIR, marker
        if asked:
            self._dir_attrs[path] = (self._default_dir_attrs(), time.monotonic() + self.timeout)
        return DIR, None

    def _creating_in(self, directory: str) -> bool:
        """Whether a lookup in ``directory`` just found a name missing (new names follow)."""
        return time.monotonic() - self._missed_in.get(directory, -CREATING_S) < CREATING_S

    def _missing_moments_ago(self, path: str) -> bool:
        """Whether the kernel's lookup of ``path`` just found nothing (the lookup before a
        rename onto a new name: the rename need not ask the store again)."""
        at = self._missing_at.pop(path, None)
        return at is not None and time.monotonic() - at < RECENT_MISSING_S

    async def _resolve_for_rename(self, path: str) -> tuple[str, ObjectInfo | None] | None:
        """:meth:`_resolve`, or what the kernel's lookup of ``path`` found moments ago (the
        lookups before a rename: it need not ask again). A directory is always asked: its
        kind may have changed under other names."""
        seen = self._found_at.pop(path, None)
        if seen is not None and time.monotonic() - seen[0] < RECENT_MISSING_S:
            return seen[1]
        return await self._resolve(path)

    async def _entry(self, path: str) -> Any:
        resolved = await self._resolve(path)
        if resolved is not None and resolved[0] != DIR and path not in self._open:
            if len(self._found_at) > 4096:
                self._found_at.clear()
            self._found_at[path] = (time.monotonic(), resolved)
        if resolved is None:
            if len(self._missing_at) > 4096:
                self._missing_at.clear()
                self._missed_in.clear()
            self._missing_at[path] = self._missed_in[path.rpartition("/")[0]] = time.monotonic()
            raise fail(errno.ENOENT)
        kind, info = resolved
        inode = self.inodes.inode(path, kind)
        if kind == DIR:
            return self._dir_entry(inode, path)
        if info is None:
            return self._open_entry(inode, self._open[path])
        return self._object_entry(inode, info)

    def _check_writable(self) -> None:
        if self.read_only:
            raise fail(errno.EROFS)

    async def _invalidate_cluster(self, path: str) -> None:
        """Tell every node's metadata cache that ``path`` changed (best effort); the worker
        also drops the listings of its parent directories. Under write-back the worker does it
        itself once the change is in the store (before, other nodes could not see it anyway)."""
        if self.durability is Durability.LOCAL:
            return
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
            attrs = self._dir_entry(self.inodes.inode(path, DIR), path)
        elif parent_inode == pyfuse3.ROOT_INODE and name == CONTROL_NAME.encode():
            attrs = self._control_attrs()
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
        if node.kind == CONTROL:
            return self._control_attrs()
        if node.kind == DIR:
            await self._refresh_dir_attrs(node.path)
            return self._dir_entry(inode, node.path)
        file = self._open.get(node.path)
        if file is not None:
            return self._open_entry(inode, file)
        info = await self._stat_file(node.path)
        if info is None:
            raise fail(errno.ENOENT)
        return self._object_entry(inode, info)

    @fuse_errors
    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any = None
    ) -> Any:
        node = self.inodes.node(inode)
        if node.kind == CONTROL:
            raise fail(errno.EACCES)
        changes_attrs = (
            fields.update_mode
            or fields.update_uid
            or fields.update_gid
            or fields.update_mtime
            or fields.update_atime
        )
        if not (fields.update_size or changes_attrs):
            return await self.getattr(inode, ctx)
        self._check_writable()
        if node.kind == DIR:
            if fields.update_size:
                raise fail(errno.EISDIR)
            await self._set_dir_attrs(node.path, attr, fields)
            return self._dir_entry(inode, node.path)
        file = self._open.get(node.path)
        if file is None and not fields.update_size:
            # attributes only (chmod, chown, touch, what tar and rsync do after close): the
            # object's metadata changes, its bytes are neither read nor written again
            info = await self._stat_file(node.path)
            if info is None:
                raise fail(errno.ENOENT)
            attrs = self._changed_attrs(attrs_of(info, self.defaults), attr, fields)
            foreign = foreign_of(info.metadata)
            self._statahead.forget(node.path)
            self._committed.pop(node.path, None)
            updated = await self._run(
                functools.partial(self.client.set_metadata, durable=self.durability),
                self._client_path(node.path),
                keep_foreign(foreign, attrs),
            )
            return self._object_entry(inode, updated)
        if file is None:
            file = await self._open_file(inode, node.path, truncate=False, create=None)
            try:
                await self._apply_setattr(file, attr, fields)
                await self._commit(file)
            finally:
                await self._release_file(file)
            info = await self._stat_file(node.path)
            if info is None:
                raise fail(errno.ENOENT)
            return self._object_entry(inode, info)
        await self._apply_setattr(file, attr, fields)
        return self._open_entry(inode, file)

    async def _apply_setattr(self, file: OpenFile, attr: Any, fields: Any) -> None:
        if fields.update_size:
            await self._make_room(file, attr.st_size)
            await self._truncate(file, attr.st_size)
        file.attrs = self._changed_attrs(file.attrs, attr, fields)
        file.changes += 1

    def _changed_attrs(self, attrs: Attrs, attr: Any, fields: Any) -> Attrs:
        now = time.time_ns()
        mode, uid, gid = attrs.mode, attrs.uid, attrs.gid
        mtime, atime = attrs.mtime_ns, attrs.atime_ns
        if fields.update_mode:
            mode = stat.S_IFMT(attrs.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            uid = attr.st_uid
        if fields.update_gid:
            gid = attr.st_gid
        if fields.update_mtime:
            mtime = attr.st_mtime_ns
        if fields.update_atime:
            atime = attr.st_atime_ns
        return Attrs(mode, uid, gid, mtime, now, atime)

    async def _set_dir_attrs(self, path: str, attr: Any, fields: Any) -> None:
        """chmod/chown/touch of a directory: its marker object carries them (made if none)."""
        if path == "":
            raise fail(errno.EPERM)  # the mount root has no marker of its own
        resolved = await self._resolve(path)
        current = (
            attrs_of(resolved[1], self.defaults, directory=True)
            if resolved and resolved[1] is not None
            else self._default_dir_attrs()
        )
        attrs = self._changed_attrs(current, attr, fields)
        if not self.markers:  # nowhere to keep them but here
            self._dir_attrs[path] = (attrs, float("inf"))
            return
        marker = resolved[1] if resolved else None
        foreign = {} if marker is None else foreign_of(marker.metadata)
        await self._put_object(self._marker(path), b"", attrs, foreign)
        self._dir_attrs[path] = (attrs, time.monotonic() + self.timeout)

    async def _put_object(
        self, client_path: str, data: bytes, attrs: Attrs, foreign: dict[str, str] | None = None
    ) -> ObjectInfo:
        """A small object (marker, symlink) written in one session; ``foreign`` is the other
        user metadata it keeps (its extended attributes)."""

        def put() -> ObjectInfo:
            session = self.client.open_session(client_path)
            try:
                if data:
                    session.write(0, data)
                return session.commit(
                    size=len(data),
                    metadata=keep_foreign(foreign or {}, attrs),
                    durable=self.durability,
                    timeout=self.sync_timeout,
                )
            except BaseException:
                session.abort()
                raise

        return await self._run(put)

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

    # -- extended attributes (user.* in the object's metadata) -----------------------------

    @staticmethod
    def _xattr_name(name: bytes) -> str:
        text = name.decode("utf-8", "surrogateescape")
        if not text.startswith(XATTR_NAMESPACE):
            raise fail(errno.EOPNOTSUPP)  # security.*, trusted.*, system.*: not kept
        try:
            check_xattr_name(text)
        except XattrError:
            raise fail(errno.EINVAL) from None
        return text

    async def _xattr_holder(self, inode: int) -> tuple[str, str, ObjectInfo | None]:
        """(kind, path, the object holding the attributes: file, or directory marker)."""
        node = self.inodes.node(inode)
        if node.kind == CONTROL:
            return CONTROL, node.path, None
        if node.kind == DIR:
            resolved = await self._resolve(node.path) if node.path else None
            return DIR, node.path, resolved[1] if resolved else None
        if node.path in self._open:
            return node.kind, node.path, None
        info = await self._stat_file(node.path)
        if info is None:
            raise fail(errno.ENOENT)
        return node.kind, node.path, info

    async def _xattrs(self, inode: int) -> dict[str, bytes]:
        kind, path, info = await self._xattr_holder(inode)
        file = self._open.get(path) if kind in (FILE, LINK) else None
        if file is not None:
            return parse_xattrs(file.foreign)
        return parse_xattrs(info.metadata) if info is not None else {}

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        if not name.startswith(XATTR_NAMESPACE.encode()):
            # the kernel asks for security.capability before every write: no round trip
            raise fail(pyfuse3.ENOATTR)
        value = (await self._xattrs(inode)).get(self._xattr_name(name))
        if value is None:
            raise fail(pyfuse3.ENOATTR)
        return value

    @fuse_errors
    async def listxattr(self, inode: int, ctx: Any = None) -> Sequence[bytes]:
        return [n.encode("utf-8", "surrogateescape") for n in await self._xattrs(inode)]

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any = None) -> None:
        self._check_writable()
        await self._change_xattr(inode, self._xattr_name(name), value)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any = None) -> None:
        self._check_writable()
        await self._change_xattr(inode, self._xattr_name(name), None)

    async def _change_xattr(self, inode: int, name: str, value: bytes | None) -> None:
        """Set (or remove, ``value`` None) one attribute: the holder's metadata is replaced,
        its bytes untouched; an open file commits it with its content."""
        kind, path, info = await self._xattr_holder(inode)
        if kind == CONTROL or path == "":
            raise fail(errno.EPERM)  # the control file and the mount root hold none
        self._committed.pop(path, None)
        if kind == LINK:
            raise fail(errno.EPERM)  # Linux keeps no user.* attributes on symlinks either
        if kind == DIR and not self.markers:
            raise fail(errno.EOPNOTSUPP)  # no marker object to carry them
        file = self._open.get(path) if kind == FILE else None
        now = time.time_ns()
        if file is not None:
            foreign, attrs = file.foreign, file.attrs
        elif kind == DIR:
            foreign = {} if info is None else foreign_of(info.metadata)
            attrs = (
                self._default_dir_attrs()
                if info is None
                else attrs_of(info, self.defaults, directory=True)
            )
        else:
            assert info is not None
            foreign, attrs = foreign_of(info.metadata), attrs_of(info, self.defaults)
        xattrs = parse_xattrs(foreign)
        if value is None:
            if xattrs.pop(name, None) is None:
                raise fail(pyfuse3.ENOATTR)
        else:
            xattrs[name] = value
        attrs = Attrs(attrs.mode, attrs.uid, attrs.gid, attrs.mtime_ns, now, attrs.atime_ns)
        foreign = with_xattrs(foreign, xattrs)
        if value is not None and metadata_bytes(keep_foreign(foreign, attrs)) > self.max_metadata:
            alone = with_xattrs({}, {name: value})
            too_big = metadata_bytes(keep_foreign(alone, attrs)) > self.max_metadata
            raise fail(errno.E2BIG if too_big else errno.ENOSPC)
        if file is not None:
            file.foreign, file.attrs = foreign, attrs
            file.changes += 1
        elif kind == DIR:
            await self._put_object(self._marker(path), b"", attrs, foreign)
            self._dir_attrs[path] = (attrs, time.monotonic() + self.timeout)
        else:
            await self._run(
                functools.partial(self.client.set_metadata, durable=self.durability),
                self._client_path(path),
                keep_foreign(foreign, attrs),
            )

    # -- directories -----------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        node = self.inodes.node(inode)
        if node.kind != DIR:
            raise fail(errno.ENOTDIR)
        path = node.path
        below = path + "/" if path else ""
        extras: dict[str, str] = {}
        for local in self._local_dirs:
            if local.startswith(below) and "/" not in local[len(below) :]:
                extras[local[len(below) :]] = DIR
        for writing in self._open:
            if writing.startswith(below) and "/" not in writing[len(below) :]:
                extras.setdefault(writing[len(below) :], FILE)
        handle = _DirHandle(inode, path, [""], -1, [], False, extras)
        await self._load_page(handle, 0)  # a directory that cannot be listed fails here
        if handle.last:  # the whole of it in one page: its names answer lookups (negative_ttl)
            self._note_listing(path, {e[0] for e in handle.entries})
        return self._alloc_fh(handle)

    async def _load_page(self, handle: _DirHandle, number: int) -> None:
        """Make page ``number`` of ``handle`` the one it holds (its start must be known)."""
        if handle.page == number:
            return
        listing, token = await self._run(
            functools.partial(self.client.list_page, after=handle.starts[number], limit=PAGE),
            self._dir_client_path(handle.path),
        )
        base = self._key(handle.path) + "/" if handle.path else self.prefix
        entries: dict[str, tuple[str, ObjectInfo | None, bool]] = {}
        for info in listing.objects:
            name = info.key[len(base) :]
            if self._valid_name(name):
                full = self.immutable or info.key in listing.full
                kind = LINK if full and attrs_of(info, self.defaults).is_symlink else FILE
                entries[name] = (kind, info, full)
        for prefix in listing.prefixes:
            name = prefix[len(base) :].rstrip("/")
            if self._valid_name(name):
                entries[name] = (DIR, None, True)  # a directory hides an object of the same name
        below = handle.path + "/" if handle.path else ""
        for name, (kind, _, _) in entries.items():
            handle.extras.pop(name, None)
            if kind == DIR:
                self._remember_dir(f"{below}{name}")
        if token is None:
            for name, kind in sorted(handle.extras.items()):
                entries.setdefault(name, (kind, None, True))
        elif number + 1 == len(handle.starts):
            handle.starts.append(token)
        handle.page, handle.last = number, token is None
        handle.entries = [(name, kind, info, full) for name, (kind, info, full) in entries.items()]
        handle.entries.sort(key=lambda e: e[0])
        asks_markers = self.markers and not self.immutable
        self._statahead.listed(
            handle.path,
            [
                # a file listed without its attributes, and a directory's marker ("d/"): the
                # kernel asks for both (lookup; getattr of the directory) as a walk goes on
                e[0] if e[1] == FILE else e[0] + "/"
                for e in handle.entries
                if (e[1] == FILE and not e[3] and f"{below}{e[0]}" not in self._open)
                or (e[1] == DIR and asks_markers and not self._dir_attrs_fresh(f"{below}{e[0]}"))
            ],
        )

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
        if start_id < DOTS:
            if not self._reply_dots(handle, start_id, token):
                return
            start_id = DOTS
        number, rest = divmod(start_id, PAGE_SPAN)
        index = max(0, rest - DOTS)
        while True:
            if number >= len(handle.starts):
                return  # past the last page
            await self._load_page(handle, number)
            if not await self._reply_entries(handle, number, index, token):
                return  # the kernel's buffer is full
            if handle.last:
                return
            number, index = number + 1, 0

    def _reply_dots(self, handle: _DirHandle, start: int, token: Any) -> bool:
        """``.`` and ``..`` from offset ``start`` on (the kernel counts no lookup for them);
        False when the kernel took no more."""
        parent = handle.path.rpartition("/")[0]
        dots = [
            (b".", self._dir_entry(handle.inode, handle.path)),
            (b"..", self._dir_entry(self.inodes.find(parent) or handle.inode, parent)),
        ]
        for offset in range(start, DOTS):
            name, attrs = dots[offset]
            if not pyfuse3.readdir_reply(token, name, attrs, offset + 1):
                return False
        return True

    async def _reply_entries(self, handle: _DirHandle, number: int, start: int, token: Any) -> bool:
        """The entries of the page held from ``start`` on; False when the kernel took no more."""
        base = handle.path
        for index in range(start, len(handle.entries)):
            name, kind, info, full = handle.entries[index]
            path = f"{base}/{name}" if base else name
            offset = number * PAGE_SPAN + index + DOTS + 1
            if (
                NAMES_ONLY
                and not full
                and kind == FILE
                and info is not None
                and path not in self._open
                and self.inodes.find(path) is None
            ):
                # attributes the kernel may not keep: the name alone, no inode for the kernel
                # to hold and this mount to track (pcache.fuse_names); a stat is a lookup
                entry = name_only(self.inodes.number(), stat.S_IFREG)
                if not pyfuse3.readdir_reply(token, name.encode("utf-8"), entry, offset):
                    return False
                continue
            inode = self.inodes.inode(path, kind)
            if kind == DIR:
                attrs = self._dir_entry(inode, path)
            elif path in self._open:
                attrs = self._open_entry(inode, self._open[path])
            elif info is not None:
                # an entry whose user metadata the worker did not know is not cached by the
                # kernel: its lookup asks (mode, owner and times come from the object's HEAD)
                attrs = self._object_entry(inode, info, trusted=full)
            else:
                attrs = self._entry_attrs(
                    inode, attrs_of(ObjectInfo(path, 0, self._started), self.defaults), 0
                )
            if not pyfuse3.readdir_reply(token, name.encode("utf-8"), attrs, offset):
                self.inodes.forget(inode, 0)  # drops it again when nobody holds it
                return False
            self.inodes.remember(inode)
        return True

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any = None) -> Any:
        self._check_writable()
        path = self._child(parent_inode, name)
        if await self._resolve(path) is not None:
            raise fail(errno.EEXIST)
        attrs = new_attrs(stat.S_IFDIR, mode, *self._owner(ctx), time.time_ns())
        if self.markers:
            await self._put_object(self._marker(path), b"", attrs)
            self._dir_attrs[path] = (attrs, time.monotonic() + self.timeout)
            self._remember_dir(path)
        else:  # this mount remembers it until rmdir or until it has content
            self._keep_dir(path)
            self._dir_attrs[path] = (attrs, float("inf"))
        self._note_added(path)
        self._note_listing(path, set())  # made here: empty
        self._missed_in[path] = time.monotonic()  # new names follow (tar, cp -r, mkdir -p)
        inode = self.inodes.inode(path, DIR)
        self.inodes.remember(inode)
        return self._entry_attrs(inode, attrs, 0)

    def _owner(self, ctx: Any) -> tuple[int, int]:
        if ctx is None:
            return self.defaults.uid, self.defaults.gid
        return int(ctx.uid), int(ctx.gid)

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
            or any(w.startswith(below) for w in self._open)
            or await self._has_content(path)
        ):
            raise fail(errno.ENOTEMPTY)
        if self.markers:
            await self._run(
                functools.partial(self.client.delete, durable=self.durability), self._marker(path)
            )
        self._forget_dir(path)
        self._note_removed(path)
        self._keep_dir(path.rpartition("/")[0])
        self.inodes.unlink(path)

    # -- symlinks and links ------------------------------------------------------------------

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any = None) -> Any:
        self._check_writable()
        path = self._child(parent_inode, name)
        if len(target) > SYMLINK_MAX:
            raise fail(errno.ENAMETOOLONG)
        if await self._resolve(path) is not None:
            raise fail(errno.EEXIST)
        attrs = new_attrs(stat.S_IFLNK, 0o777, *self._owner(ctx), time.time_ns())
        await self._put_object(self._client_path(path), target, attrs)
        self._note_added(path)
        inode = self.inodes.inode(path, LINK)
        self.inodes.remember(inode)
        return self._entry_attrs(inode, attrs, len(target))

    @fuse_errors
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        node = self.inodes.node(inode)
        if node.kind != LINK:
            raise fail(errno.EINVAL)
        return await self._run(self.client.read, self._client_path(node.path))

    @fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any = None
    ) -> Any:
        # an object store has no second name for one object: a copy would silently diverge
        raise fail(errno.EPERM)

    # -- removing and renaming -------------------------------------------------------------

    def _detach(self, path: str) -> None:
        """An open file's name is gone: its descriptors keep working, nothing is committed."""
        file = self._open.pop(path, None)
        if file is not None:
            file.unlinked = True

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any = None) -> None:
        self._check_writable()
        path = self._child(parent_inode, name)
        resolved = await self._resolve(path)
        if resolved is None:
            raise fail(errno.ENOENT)
        if resolved[0] == DIR:
            raise fail(errno.EISDIR)
        self._detach(path)
        await self._run(
            functools.partial(self.client.delete, durable=self.durability), self._client_path(path)
        )
        await self._invalidate_cluster(path)
        self._note_removed(path)
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
        source = await self._resolve_for_rename(old)
        if source is None:
            raise fail(errno.ENOENT)
        if old == new:
            return
        if source[0] == DIR and (new + "/").startswith(old + "/"):
            raise fail(errno.EINVAL)  # into itself
        target = None
        if flags & pyfuse3.RENAME_NOREPLACE or not self._missing_moments_ago(new):
            target = await self._resolve_for_rename(new)
        if target is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise fail(errno.EEXIST)
            if target[0] == DIR and source[0] != DIR:
                raise fail(errno.EISDIR)
            if source[0] == DIR and target[0] != DIR:
                raise fail(errno.ENOTDIR)
            if target[0] == DIR and await self._has_content(new):
                raise fail(errno.ENOTEMPTY)
        if source[0] == DIR:
            await self._rename_dir(old, new, target is not None)
        else:
            await self._rename_file(old, new)
        self._note_removed(old)
        self._note_removed(new)
        self._note_added(new)
        self._keep_dir(old.rpartition("/")[0])
        self.inodes.unlink(new)
        self.inodes.move(old, new)

    async def _rename_file(self, old: str, new: str) -> None:
        file = self._open.get(old)
        if file is not None and file.session is None and file.dirty:
            await self._commit(file)  # a small file only the mount knows yet: journal it first
        self._detach(new)
        await self._run(
            functools.partial(self.client.rename, durable=self.durability),
            self._client_path(old),
            self._client_path(new),
        )
        file = self._open.pop(old, None)
        if file is not None:  # its writers go on under the new name (the worker moved them)
            file.path, file.client_path = new, self._client_path(new)
            self._open[new] = file
        await self._invalidate_cluster(new)
        if old.rpartition("/")[0] != new.rpartition("/")[0]:
            await self._invalidate_cluster(old)

    async def _rename_dir(self, old: str, new: str, replace_empty: bool) -> None:
        """Key by key: not atomic (a crash midway leaves some keys under each name; running the
        same ``mv`` again finishes it). Refused with ``EXDEV`` above ``max_dir_rename`` keys,
        so ``mv`` copies instead of starting what it cannot finish quickly."""
        listing = await self._run(
            functools.partial(self.client.list_dir, recursive=True), self._dir_client_path(old)
        )
        keys = [o.key for o in listing.objects]
        if len(keys) > self.max_dir_rename:
            raise fail(errno.EXDEV)
        base_old, base_new = self._key(old) + "/", self._key(new) + "/"
        if replace_empty and self.markers:
            await self._run(
                functools.partial(self.client.delete, durable=self.durability), self._marker(new)
            )
        if any(w == old or w.startswith(old + "/") for w in self._open):
            for path in [w for w in self._open if w.startswith(old + "/")]:
                file = self._open.pop(path)
                file.path = new + path[len(old) :]
                file.client_path = self._client_path(file.path)
                self._open[file.path] = file
        for key in keys:
            await self._run(
                functools.partial(self.client.rename, durable=self.durability),
                f"{self.namespace}/{key}",
                f"{self.namespace}/{base_new}{key[len(base_old) :]}",
            )
        if self.markers and base_old not in keys:  # an implicit directory: the new one stays
            await self._put_object(
                self._marker(new), b"", self._dir_attrs.get(old, (self._default_dir_attrs(), 0))[0]
            )
        for local in [d for d in self._local_dirs if d == old or d.startswith(old + "/")]:
            self._local_dirs.discard(local)
            self._local_dirs.add(new + local[len(old) :])
        self._forget_dir(old)
        self._remember_dir(new)
        await self._invalidate_cluster(old)
        await self._invalidate_cluster(new)

    # -- open files ------------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any = None) -> Any:
        node = self.inodes.node(inode)
        if node.kind == DIR:
            raise fail(errno.EISDIR)
        if node.kind == CONTROL:
            return self._open_control(flags)
        info = pyfuse3.FileInfo()
        info.direct_io = False
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        file = self._open.get(node.path)
        if not writable and file is None:
            reader = await self._run(PcacheReader, self.client, self._client_path(node.path))
            info.fh = self._alloc_fh(_ReadHandle(inode, node.path, reader))
            info.keep_cache = self.immutable
            return info
        if writable:
            self._check_writable()
            if file is None:
                file = await self._open_file(
                    inode, node.path, truncate=bool(flags & os.O_TRUNC), create=None
                )
            elif flags & os.O_TRUNC:
                await self._truncate(file, 0)
        assert file is not None
        file.handles += 1
        info.fh = self._alloc_fh(
            _FileHandle(inode, file, writable, append=bool(flags & os.O_APPEND))
        )
        info.keep_cache = False
        info.direct_io = _bypasses_page_cache(flags)
        return info

    async def _open_file(
        self, inode: int, path: str, *, truncate: bool, create: Attrs | None
    ) -> OpenFile:
        """The shared :class:`OpenFile` of ``path``: a new session, filled with the object's
        content unless ``truncate`` or ``create`` (the attributes of a new file)."""
        if path in self._open:
            return self._open[path]
        client_path = self._client_path(path)
        current = None if create is not None else await self._stat_file(path)
        if create is None and current is None:
            raise fail(errno.ENOENT)
        if create is not None:
            file = OpenFile(path, client_path, None, -1, 0, create, buffer=bytearray())
        else:
            assert current is not None
            attrs = attrs_of(current, self.defaults)
            foreign = foreign_of(current.metadata)
            if truncate or current.size <= SMALL_FILE_MAX:
                content = b""
                if not truncate and current.size:
                    content = await self._run(self.client.read, client_path)
                file = OpenFile(
                    path,
                    client_path,
                    None,
                    -1,
                    len(content),
                    attrs,
                    foreign,
                    buffer=bytearray(content),
                    frontier=len(content),
                )
            else:
                file = await self._open_staged(path, client_path, current, attrs, foreign)
        if create is not None or (truncate and current is not None and current.size):
            file.touch()  # a new or emptied file: it must be committed even if never written
        if path in self._open:  # another open won the race meanwhile: use that one
            end_session(file)
            return self._open[path]
        self._open[path] = file
        return file

    async def _open_staged(
        self,
        path: str,
        client_path: str,
        current: ObjectInfo,
        attrs: Attrs,
        foreign: dict[str, str],
    ) -> OpenFile:
        """A large existing object opened for writing: a staging file that copies it block by
        block as needed (one still pending here is copied at once)."""
        session, fd = await self._run(open_staging, self.client, client_path)
        lazy = not is_pending(current.version)
        try:
            await self._run(session.reserve, current.size)
            if lazy:
                os.ftruncate(fd, current.size)  # holes, copied in when needed
                size = current.size
            else:
                size = await self._run(fill_from, self.client, client_path, fd, current)
        except BaseException:
            os.close(fd)
            with trio.CancelScope(shield=True):
                await self._run(session.abort)
            raise
        # frontier 0: what the object held is not uploaded early (written over, it would be
        # sent twice); the commit sends the rest as the writer leaves it
        file = OpenFile(path, client_path, session, fd, size, attrs, foreign)
        if lazy:
            block = self.block_size
            file.source, file.source_path, file.source_size = current, client_path, size
            file.block_size = block
            file.absent = set(range(-(-size // block)))
        return file

    def _open_control(self, flags: int) -> Any:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise fail(errno.EACCES)
        content = self.stats.render(
            dict(self.client.reads.sources),
            open_files=sum(
                isinstance(h, _ReadHandle | _FileHandle) for h in self._handles.values()
            ),
            files_being_written=len(self._open),
            inodes=len(self.inodes),
            stat_ahead=self._statahead.counts(),
            read_only=self.read_only,
            immutable=self.immutable,
            durability=self.durability.value,
        )
        info = pyfuse3.FileInfo()
        info.fh = self._alloc_fh(_ControlHandle(content))
        info.direct_io = True  # the size is 0: reads must reach us, not the page cache
        info.keep_cache = False
        return info

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any = None
    ) -> tuple[Any, Any]:
        self._check_writable()
        path = self._child(parent_inode, name)
        if self._dir_known_locally(path):
            raise fail(errno.EISDIR)
        inode = self.inodes.inode(path, FILE)
        file = self._open.get(path)
        if file is None:
            attrs = new_attrs(stat.S_IFREG, mode, *self._owner(ctx), time.time_ns())
            file = await self._open_file(inode, path, truncate=True, create=attrs)
            self._note_added(path)
        elif flags & os.O_TRUNC:
            await self._truncate(file, 0)
        file.handles += 1
        info = pyfuse3.FileInfo()
        info.fh = self._alloc_fh(_FileHandle(inode, file, True, append=bool(flags & os.O_APPEND)))
        info.direct_io = _bypasses_page_cache(flags)
        info.keep_cache = False
        self.inodes.remember(inode)
        return info, self._open_entry(inode, file)

    def _file_handle(self, fh: int) -> _FileHandle:
        handle = self._handles.get(fh)
        if not isinstance(handle, _FileHandle):
            raise fail(errno.EBADF)
        return handle

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles.get(fh)
        if isinstance(handle, _ControlHandle):
            return handle.content[off : off + size]
        if isinstance(handle, _FileHandle):
            await self._copy_in(handle.file, off, size)
            data = handle.file.pread(off, size)  # a local file: no thread hop
        elif isinstance(handle, _ReadHandle):
            file = self._open.get(handle.path)
            if file is not None:  # opened before a writer came: it sees the writer's bytes
                await self._copy_in(file, off, size)
                data = file.pread(off, size)
            else:
                data = await self._read_object(handle, off, size)
        else:
            raise fail(errno.EBADF)
        self.stats.read(size, len(data))
        return data

    async def _read_object(self, handle: _ReadHandle, off: int, size: int) -> bytes:
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
        return data

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._file_handle(fh)
        if not handle.writable:
            raise fail(errno.EBADF)
        file = handle.file
        if handle.append:
            off = file.size  # without the kernel's writeback cache, O_APPEND is ours to do
        if file.failed:
            raise fail(file.failed)
        end = off + len(buf)
        if file.needs_room(end):
            async with file.lock:
                try:
                    await self._make_room(file, end)
                except Exception as exc:
                    # a file that lost a write is never committed half: close says so
                    file.failed = errno_for(exc, "write")
                    raise
        if file.missing(off, len(buf)):  # over blocks not copied yet: under the lock
            async with file.lock:
                await self._copy_in(file, off, len(buf), locked=True, partly_only=True)
                written = file.pwrite(off, buf)
        else:
            written = file.pwrite(off, buf)
        self.stats.wrote(written)
        return written

    async def _truncate(self, file: OpenFile, size: int) -> None:
        if file.absent:  # no copy in flight may land past the new end
            async with file.lock:
                file.truncate(size)
        else:
            file.truncate(size)

    async def _copy_in(
        self,
        file: OpenFile,
        offset: int,
        length: int,
        *,
        locked: bool = False,
        partly_only: bool = False,
    ) -> None:
        """Copy the source's blocks that ``[offset, offset + length)`` needs into the staging
        file (all it touches, or for a write only those it covers in part)."""
        if not file.missing(offset, length):
            return
        if not locked:
            async with file.lock:
                await self._copy_in(file, offset, length, locked=True, partly_only=partly_only)
            return
        wanted = (
            file.partly_written(offset, length) if partly_only else file.missing(offset, length)
        )
        if wanted:
            await self._run(copy_blocks, self.client, file, wanted)
            file.copied(wanted)

    async def _make_room(self, file: OpenFile, end: int) -> None:
        """Capacity for ``file`` to grow to ``end``; when the cache is full, its parts already in
        the store are dropped from the disk to make it (see pcache.fuse_files)."""
        while file.needs_room(end):
            progress = file.take_progress()
            try:
                release = await self._run(make_room, self.client, file, end, progress)
            except BaseException:
                file.restore_progress(progress)
                raise
            if release and not file.release(release) and not file.overwritten:
                raise fail(errno.ENOSPC)

    async def _commit(self, file: OpenFile, durability: Durability | None = None) -> None:
        if file.failed:
            raise fail(file.failed)
        async with file.lock:
            if not file.dirty or file.unlinked:
                return
            progress = file.take_progress()
            try:
                info = await self._run(
                    functools.partial(commit, close=False, progress=progress),
                    self.client,
                    file,
                    durability or self.durability,
                )
            except BaseException:
                file.restore_progress(progress)
                self._committed.pop(file.path, None)
                raise
            if info is not None and not file.dirty:
                if len(self._committed) > 4096:
                    self._committed.clear()
                self._committed[file.path] = (time.monotonic(), info)
        await self._invalidate_cluster(file.path)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        handle = self._handles.get(fh)
        if isinstance(handle, _FileHandle) and handle.writable:
            # close(2) waits for FLUSH but not for RELEASE: committing here is what makes the
            # file local-durable (or in the store, --durability remote) when close returns
            await self._commit(handle.file)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handles.get(fh)
        if isinstance(handle, _FileHandle):
            file = handle.file
            if file.dirty:
                await self._commit(file, Durability.REMOTE)
            elif not file.unlinked:
                await self._run(self.client.flush, file.client_path, self.sync_timeout)
        elif isinstance(handle, _ReadHandle):
            await self._run(self.client.flush, self._client_path(handle.path), self.sync_timeout)

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, _ReadHandle):
            await self._run(handle.reader.close)
        elif isinstance(handle, _FileHandle):
            await self._release_file(handle.file)

    async def _release_file(self, file: OpenFile) -> None:
        file.handles -= 1
        if file.handles > 0:
            return
        try:
            if file.dirty and not file.unlinked and not file.failed:
                await self._commit(file)
        finally:
            if file.handles <= 0:
                if self._open.get(file.path) is file:
                    del self._open[file.path]
                # new names are expected beside a file just written (the target of its rename,
                # the next shard): their lookups ask for the file and the directory at once
                if len(self._missed_in) > 4096:
                    self._missed_in.clear()
                self._missed_in[file.path.rpartition("/")[0]] = time.monotonic()
                if file.session is not None:  # a small file has no session to end
                    with trio.CancelScope(shield=True):
                        await self._run(end_session, file)

    # -- shutdown --------------------------------------------------------------------------

    def abort_writes(self) -> None:
        """The mount is going away (called outside trio): commit what the writers left dirty,
        so nothing written through the mount is lost, then close the sessions."""
        for file in list(self._open.values()):
            try:
                if file.dirty and not file.unlinked and not file.failed:
                    log.warning("unmounted while %s was open for writing: committing it", file.path)
                    commit(self.client, file, self.durability, close=True)
            except Exception as exc:
                log.error("could not commit %s at unmount: %s", file.path, exc)
            end_session(file)
        self._open.clear()
