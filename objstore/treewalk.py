"""Object-store listing semantics over a directory tree.

Object stores list keys in UTF-8 byte order, with ``start_after`` and a ``/`` delimiter. A
directory tree only lists one directory at a time, and sorting each directory by name is not the
same order ("a-b" sorts before "a/c" because '-' < '/'). This module walks a tree in true key order
by sorting each directory's entries as ``name`` for files and ``name + "/"`` for directories, and
prunes whole subtrees that sort before ``start_after``, so a page costs O(page + depth) directory
reads rather than a walk of everything before it. Both the local and the fsspec backends use it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .base import ListPage, ObjectInfo
from .url import RESERVED_PREFIX, StoreURL, check_prefix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One directory entry as a backend reports it."""

    name: str
    is_dir: bool
    size: int = 0
    mtime: float = 0.0
    etag: str = ""


# Lists one directory (a key prefix ending in "/" or "" for the root); missing dir -> [].
ListDir = Callable[[str], list[Entry]]


def walk(
    listdir: ListDir,
    prefix: str,
    start_after: str = "",
    delimiter: str = "",
    hidden: Callable[[str], bool] = lambda name: False,
) -> Iterator[tuple[str, Entry | None]]:
    """Yield ``(key, entry)`` for objects and ``(prefix, None)`` for common prefixes, in order.

    Args:
        listdir: lists one directory by its key prefix.
        prefix: only keys starting with this.
        start_after: only keys (and common prefixes) strictly greater than this.
        delimiter: ``"/"`` rolls each subdirectory up into one common prefix; ``""`` recurses.
        hidden: names to skip (bookkeeping files).
    """
    if delimiter not in ("", "/"):
        raise ValueError("only '/' is supported as a delimiter")
    # Start in the deepest directory the prefix fully names; the rest filters names.
    base, _, name_prefix = prefix.rpartition("/")
    base = base + "/" if base else ""
    yield from _walk_dir(listdir, base, name_prefix, start_after, delimiter, hidden)


def _walk_dir(
    listdir: ListDir,
    dir_key: str,
    name_prefix: str,
    start_after: str,
    delimiter: str,
    hidden: Callable[[str], bool],
) -> Iterator[tuple[str, Entry | None]]:
    entries = [e for e in listdir(dir_key) if e.name.startswith(name_prefix) and not hidden(e.name)]
    entries.sort(key=lambda e: e.name + "/" if e.is_dir else e.name)
    for entry in entries:
        key = dir_key + entry.name
        if not entry.is_dir:
            if key > start_after:
                yield key, entry
            continue
        sub = key + "/"
        # Every key below `sub` is < start_after when sub < start_after and is not its prefix.
        if sub <= start_after and not start_after.startswith(sub):
            continue
        if delimiter:
            if sub > start_after:
                yield sub, None
            continue
        yield from _walk_dir(listdir, sub, "", start_after, delimiter, hidden)


def _bookkeeping(name: str) -> bool:
    return name.startswith(RESERVED_PREFIX)


def list_page(
    listdir: ListDir,
    prefix: str,
    *,
    start_after: str = "",
    delimiter: str = "",
    limit: int = 1000,
    token: str | None = None,
) -> ListPage:
    """One page of :meth:`Store.list_page` semantics over a tree; the token is the last key.

    Bookkeeping names (the reserved ``.objstore-`` prefix) are never listed.
    """
    limit = max(1, min(limit, 1000))
    objects: list[ObjectInfo] = []
    prefixes: list[str] = []
    last = ""
    for key, entry in walk(listdir, prefix, max(start_after, token or ""), delimiter, _bookkeeping):
        if len(objects) + len(prefixes) == limit:
            return ListPage(objects, prefixes, last)
        if entry is None:
            prefixes.append(key)
        else:
            objects.append(ObjectInfo(key, entry.size, entry.mtime, entry.etag))
        last = key
    return ListPage(objects, prefixes, None)


class TreeListing:
    """``Store.list_page`` for backends that keep objects in a directory tree (local, fsspec).

    The backend supplies ``_listdir`` (one directory's entries), ``_require_root`` and its
    ``_errors`` translation context.
    """

    url: StoreURL

    def _listdir(self, dir_key: str) -> list[Entry]:
        raise NotImplementedError

    def _require_root(self, operation: str) -> None:
        raise NotImplementedError

    def _errors(self, operation: str, key: str = "") -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def list_page(
        self,
        prefix: str = "",
        *,
        start_after: str = "",
        delimiter: str = "",
        limit: int = 1000,
        token: str | None = None,
    ) -> ListPage:
        check_prefix(prefix, url=str(self.url))
        self._require_root("list")
        with self._errors("list"):
            return list_page(
                self._listdir,
                prefix,
                start_after=start_after,
                delimiter=delimiter,
                limit=limit,
                token=token,
            )
