"""Directory entries that give the kernel a name and a type, and no inode.

pyfuse3 answers every ``readdir`` as ``readdirplus`` (it clears ``FUSE_CAP_READDIRPLUS_AUTO``)
and takes an entry's node id and its ``d_ino`` from one field, so each listed name makes the
kernel build an inode and a dentry, and the file system keep that inode until the kernel
forgets it: listing a directory of 1,000,000 objects pinned a million inodes in the kernel
(about a kilobyte each) and a million records in the mount (about 270 bytes each), although
those entries carry no attributes the kernel may keep (an object listed without its user
metadata: the next ``stat`` asks anyway).

The kernel's protocol has the answer: an entry whose node id is 0 is a name only
(``fs/fuse/readdir.c``, ``fuse_direntplus_link``: "zero nodeid ... only means the userspace
filesystem did not want to return attributes/handle for this entry"), emitted with its
``d_ino`` and ``d_type``; the kernel links nothing, counts no lookup, and a later ``stat`` is a
``LOOKUP`` as after a plain ``readdir``. pyfuse3 3.5 has no way to say it, so :func:`name_only`
clears the node id inside the ``EntryAttributes``' C struct (``fuse_entry_param.ino``), leaving
``attr.st_ino`` (the ``d_ino``). Where it is was found once, at import, from sentinel values
written through pyfuse3's own setters and read back; when the layout is not the expected one
(another pyfuse3 build), :data:`NAMES_ONLY` is False and every entry carries its inode as
before. Nothing else in the object is touched.
"""

from __future__ import annotations

import ctypes
import logging
import sys

import pyfuse3

log = logging.getLogger(__name__)

_INO = 0x5AC3_1F0E_9D24_7B68  # sentinels: no real field holds these by chance
_GENERATION = 0x3E71_A5C9_0B86_D412
_STAT_INO_AT = 24  # fuse_entry_param: ino, generation, struct stat {st_dev, st_ino, ...}


def _node_id_offset() -> int | None:
    """Where ``fuse_entry_param.ino`` lies in an ``EntryAttributes``, or None if unsure."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = _INO  # sets fuse_param.ino and attr.st_ino
    entry.generation = _GENERATION
    size = sys.getsizeof(entry)
    raw = ctypes.string_at(id(entry), size)
    ino = _INO.to_bytes(8, sys.byteorder)
    at = raw.find(ino)
    if (
        at < 0
        or raw.count(ino) != 2
        or raw.find(ino, at + 1) != at + _STAT_INO_AT
        or raw[at + 8 : at + 16] != _GENERATION.to_bytes(8, sys.byteorder)
    ):
        return None
    ctypes.c_uint64.from_address(id(entry) + at).value = 0
    after = ctypes.string_at(id(entry), size)
    if entry.st_ino != 0 or after[at + _STAT_INO_AT : at + _STAT_INO_AT + 8] != ino:
        return None
    return at


_OFFSET = _node_id_offset()
NAMES_ONLY = _OFFSET is not None
if not NAMES_ONLY:
    log.info("pyfuse3's EntryAttributes layout is not the expected one: listed names carry inodes")


def name_only(d_ino: int, mode: int) -> pyfuse3.EntryAttributes:
    """A ``readdir`` entry of type ``mode`` (``S_IFREG``...) and number ``d_ino`` that hands
    the kernel no inode. Only when :data:`NAMES_ONLY`."""
    assert _OFFSET is not None
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = d_ino
    entry.st_mode = mode
    ctypes.c_uint64.from_address(id(entry) + _OFFSET).value = 0
    return entry
