"""The floor of a Python FUSE file system: a pyfuse3 pass-through to a local directory.

``python bench/fuse_floor.py BACKING MOUNTPOINT`` mounts BACKING at MOUNTPOINT (foreground,
until SIGTERM or ``fusermount3 -u``). Every request goes through pyfuse3 and trio and then
straight to the local file system, with nothing else: no cache, no store, no bookkeeping.
``close`` fsyncs (FLUSH does what pcache's close does: the bytes are durable on the local
disk). What this mount reaches is what any file system written on pyfuse3 can reach on the
machine; ``bench/mount_vs_peers.py`` runs it beside pcache as the ``floor`` contender, so the
distance between the local disk and pcache splits into the part FUSE in Python costs and the
part pcache's own work costs.

It is a measuring instrument, not a file system to use: no permissions are checked (mount it
only where the bench runs), hard links and xattrs are refused, inodes are never forgotten.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from typing import Any

import pyfuse3
import trio


class PassThrough(pyfuse3.Operations):
    """Inode numbers map to paths under the backing directory; each handle is an fd."""

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = os.path.abspath(root)
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: self.root}
        self.inodes: dict[str, int] = {self.root: pyfuse3.ROOT_INODE}
        self.next_inode = pyfuse3.ROOT_INODE + 1
        self.dirs: dict[int, list[tuple[bytes, int]]] = {}

    def _inode(self, path: str) -> int:
        inode = self.inodes.get(path)
        if inode is None:
            inode = self.inodes[path] = self.next_inode
            self.paths[inode] = path
            self.next_inode += 1
        return inode

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self.paths[parent], os.fsdecode(name))

    def _attrs(self, path: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = self._inode(path)
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size"):
            setattr(attrs, name, getattr(st, name))
        attrs.st_blksize, attrs.st_blocks = st.st_blksize, st.st_blocks
        attrs.st_atime_ns, attrs.st_mtime_ns = st.st_atime_ns, st.st_mtime_ns
        attrs.st_ctime_ns = st.st_ctime_ns
        attrs.attr_timeout = attrs.entry_timeout = 1.0
        return attrs

    def _move(self, old: str, new: str) -> None:
        for path in [p for p in self.inodes if p == old or p.startswith(old + "/")]:
            inode = self.inodes.pop(path)
            moved = new + path[len(old) :]
            self.inodes[moved], self.paths[inode] = inode, moved

    @staticmethod
    def _os(call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        return self._attrs(self._child(parent_inode, name))

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attrs(self.paths[inode])

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        path = self.paths[inode]
        if fields.update_size:
            self._os(os.truncate, path, attr.st_size)
        if fields.update_mode:
            self._os(os.chmod, path, stat.S_IMODE(attr.st_mode))
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            times = (
                attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns,
            )
            self._os(lambda: os.utime(path, ns=times, follow_symlinks=False))
        return self._attrs(path)

    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        return os.fsencode(self._os(os.readlink, self.paths[inode]))

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        path = self._child(parent_inode, name)
        self._os(os.symlink, os.fsdecode(target), path)
        return self._attrs(path)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        path = self._child(parent_inode, name)
        self._os(os.mkdir, path, mode)
        return self._attrs(path)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._os(os.rmdir, self._child(parent_inode, name))

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._os(os.unlink, self._child(parent_inode, name))

    async def rename(self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, flags: int, ctx: Any) -> None:  # fmt: skip
        old, new = self._child(p_old, n_old), self._child(p_new, n_new)
        self._os(os.rename, old, new)
        self._move(old, new)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def opendir(self, inode: int, ctx: Any) -> int:
        path = self.paths[inode]
        with os.scandir(path) as entries:
            names = sorted(e.name for e in entries)
        self.dirs[inode] = [(os.fsencode(n), i) for i, n in enumerate(names, start=1)]
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        for name, next_id in self.dirs.get(fh, [])[start_id:]:
            path = os.path.join(self.paths[fh], os.fsdecode(name))
            try:
                attrs = self._attrs(path)
            except pyfuse3.FUSEError:
                continue
            if not pyfuse3.readdir_reply(token, name, attrs, next_id):
                return

    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        fd = self._os(os.open, self.paths[inode], flags & ~(os.O_CREAT | os.O_EXCL))
        return pyfuse3.FileInfo(fh=fd)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        path = self._child(parent_inode, name)
        fd = self._os(os.open, path, flags | os.O_CREAT | os.O_TRUNC, mode)
        return pyfuse3.FileInfo(fh=fd), self._attrs(path)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(self._os(os.pread, fh, size, off))

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return int(self._os(os.pwrite, fh, buf, off))

    async def flush(self, fh: int) -> None:
        self._os(os.fsync, fh)  # close returns local-durable, as pcache's does

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._os(os.fdatasync if datasync else os.fsync, fh)

    async def release(self, fh: int) -> None:
        os.close(fh)

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def statfs(self, ctx: Any) -> Any:
        st = os.statvfs(self.root)
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):  # fmt: skip
            setattr(out, name, getattr(st, name))
        return out


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    backing, mountpoint = sys.argv[1:]
    options = set(pyfuse3.default_options) | {"fsname=fuse-floor"}
    options.discard("default_permissions")
    pyfuse3.init(PassThrough(backing), mountpoint, options)
    signal.signal(signal.SIGTERM, lambda *_: pyfuse3.terminate())
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
