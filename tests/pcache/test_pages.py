"""Listing pages (``pcache.pages``): names in order after a token, from a whole listing or from
a store (the local file store: real listing code, no server)."""

from __future__ import annotations

from pathlib import Path

from objstore import open_store
from objstore.base import ListPage, ObjectInfo
from pcache.pages import PageAt, listed_name, names_after, store_page


def _names(page: ListPage) -> list[str]:
    return sorted([o.key for o in page.objects] + page.prefixes)


def _walk(fetch, limit: int) -> tuple[list[str], int]:
    """Every name, page by page, each page at most ``limit`` names; and the page count."""
    after, names, pages = "", [], 0
    while True:
        page = fetch(after, limit)
        pages += 1
        got = _names(page)
        assert len(got) <= limit and all(n > after for n in got)
        names.extend(got)
        if page.token is None:
            return names, pages
        assert page.token == got[-1]  # stateless: the last name given
        after = page.token


def test_pages_of_a_whole_listing_merge_objects_and_prefixes_in_order() -> None:
    objects = [ObjectInfo(k, 1, 0.0) for k in ("d/a", "d/b!", "d/c", "d/é")]
    whole = ListPage(objects, ["d/b/", "d/d/"], None)
    names, pages = _walk(lambda after, limit: names_after(whole, after, limit), 2)
    assert names == ["d/a", "d/b!", "d/b/", "d/c", "d/d/", "d/é"] and pages == 3
    assert _names(names_after(whole, "d/b/", 10)) == ["d/c", "d/d/", "d/é"]
    assert names_after(whole, "d/é", 10) == ListPage([], [], None)
    assert (
        listed_name("d/", "/", "d/sub/x") == "d/sub/" and listed_name("d/", "", "d/s/x") == "d/s/x"
    )


def test_store_pages_resume_after_any_name_and_skip_a_prefix_given_last(tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    root.mkdir()
    store = open_store(f"file://{root}")
    keys = [f"flat/f{i:03d}" for i in range(25)] + ["flat/sub/x", "flat/sub/y", "flat/ü"]
    keys += [f"flat/t{i}/k" for i in range(3)]
    for key in keys:
        store.put(key, b"x")
    expected = sorted({listed_name("flat/", "/", k) for k in keys})
    for limit in (1, 4, 1000):
        names, pages = _walk(lambda a, n: store_page(store, PageAt("flat/", "/", a, n)), limit)
        assert names == expected, limit
        full = -(-len(expected) // limit)
        assert pages in (full, full + 1)  # the store may only learn at the next page it is done
    # resumed after a prefix: its keys (which sort after it) are not given again
    assert _names(store_page(store, PageAt("flat/", "/", "flat/sub/", 2))) == [
        "flat/t0/",
        "flat/t1/",
    ]
    names, _ = _walk(lambda a, n: store_page(store, PageAt("flat/", "", a, n)), 7)
    assert names == sorted(keys)  # recursive
