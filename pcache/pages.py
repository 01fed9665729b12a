"""Pages of a directory listing: names in order after a given one, from a whole listing or
from the store.

A page's ``token`` is the ``after`` of the next one (the last name it gave), so paging is
stateless: any page can be asked again, from a cached listing or the store alike, and names
added or removed between pages show or not by where they sort (as with ``readdir``).
Names compare as ``str`` (code points), which is the UTF-8 byte order stores list in. A
sub-prefix ``d/`` given last comes first again from a store asked for keys after it (its
keys sort after it); it is skipped.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

from objstore.base import ListPage, ObjectInfo, Store

LIST_PAGE_MAX = 1000  # names in one page of /v1/list (a store's page)


class PageAt(NamedTuple):
    """Where a page of a listing is: ``limit`` names of ``prefix`` (rolled up at
    ``delimiter``) after ``after``."""

    prefix: str
    delimiter: str
    after: str
    limit: int

    @property
    def key(self) -> str:
        """One string naming it (a cache key; its first field is the prefix)."""
        return f"{self.prefix}\x00{self.delimiter}\x00{self.after}\x00{self.limit}"


def listed_name(prefix: str, delimiter: str, key: str) -> str:
    """What ``key`` shows as in a listing of ``prefix``: itself, or its sub-prefix."""
    rest = key[len(prefix) :]
    if delimiter and delimiter in rest:
        return prefix + rest.split(delimiter, 1)[0] + delimiter
    return key


def names_after(page: ListPage, after: str, limit: int) -> ListPage:
    """The first ``limit`` names of ``page`` (objects and prefixes merged in order) greater
    than ``after``; ``token``: the last name given when more follow, else the page's."""
    objects, prefixes = page.objects, page.prefixes
    i = bisect.bisect_right(objects, after, key=lambda o: o.key) if after else 0
    j = bisect.bisect_right(prefixes, after) if after else 0
    taken_objects: list[ObjectInfo] = []
    taken_prefixes: list[str] = []
    last = after
    while len(taken_objects) + len(taken_prefixes) < limit and (
        i < len(objects) or j < len(prefixes)
    ):
        if j >= len(prefixes) or (i < len(objects) and objects[i].key < prefixes[j]):
            taken_objects.append(objects[i])
            last = objects[i].key
            i += 1
        else:
            taken_prefixes.append(prefixes[j])
            last = prefixes[j]
            j += 1
    more = i < len(objects) or j < len(prefixes)
    return ListPage(taken_objects, taken_prefixes, last if more else page.token)


def store_page(store: Store, at: PageAt) -> ListPage:
    """The page ``at`` of the store's listing, names greater than ``after`` (a sub-prefix
    given last comes back first from the store, and is skipped); token: the next ``after``."""
    prefix, delimiter, after, limit = at
    token: str | None = None
    while True:
        got = store.list_page(
            prefix, start_after=after, delimiter=delimiter, limit=limit, token=token
        )
        page = names_after(ListPage(got.objects, got.prefixes, None), after, limit)
        if page.objects or page.prefixes or got.token is None:
            if got.token is None and page.token is None:
                return page
            names = [o.key for o in page.objects[-1:]] + page.prefixes[-1:]
            return ListPage(page.objects, page.prefixes, page.token or max(names))
        token = got.token  # only the sub-prefix given last came back: on
