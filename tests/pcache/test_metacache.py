"""The metadata cache: TTLs, negative entries, immutable mode, invalidation of parents."""

from __future__ import annotations

from objstore.base import ListPage, ObjectInfo
from pcache.metacache import MISSING, MetadataCache
from pcache.pages import PageAt


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_ttl_and_negative_entries() -> None:
    clock = Clock()
    cache = MetadataCache(ttl=30, negative_ttl=5, clock=clock)
    info = ObjectInfo("a/b.bin", 10, 0.0, "e1")
    cache.put_stat("ns", "a/b.bin", info)
    cache.put_stat("ns", "a/missing", MISSING)
    clock.now = 4.9
    assert cache.get_stat("ns", "a/b.bin") == info
    assert cache.get_stat("ns", "a/missing") is MISSING
    clock.now = 5.1
    assert cache.get_stat("ns", "a/missing") is None  # negative entries expire sooner
    assert cache.get_stat("ns", "a/b.bin") == info
    clock.now = 30.1
    assert cache.get_stat("ns", "a/b.bin") is None
    assert cache.get_stat("other", "a/b.bin") is None


def test_immutable_mode_never_expires() -> None:
    clock = Clock()
    cache = MetadataCache(ttl=1, negative_ttl=1, immutable=True, clock=clock)
    cache.put_stat("ns", "k", ObjectInfo("k", 1, 0.0))
    cache.put_listing("ns", "dir/", ListPage([], ["dir/sub/"], None))
    clock.now = 1e9
    assert cache.get_stat("ns", "k") is not None
    assert cache.get_listing("ns", "dir/") is not None


def test_invalidate_drops_path_and_parent_listings() -> None:
    cache = MetadataCache(ttl=60, negative_ttl=60)
    for key in ("d/x/1", "d/x/2", "d/y/1", "e/1"):
        cache.put_stat("ns", key, ObjectInfo(key, 1, 0.0))
    for prefix in ("", "d/", "d/x/", "d/y/", "e/"):
        cache.put_listing("ns", prefix, ListPage([], [], None))
    cache.invalidate("ns", "d/x/")
    assert cache.get_stat("ns", "d/x/1") is None and cache.get_stat("ns", "d/x/2") is None
    assert cache.get_stat("ns", "d/y/1") is not None and cache.get_stat("ns", "e/1") is not None
    assert cache.get_listing("ns", "d/x/") is None
    assert cache.get_listing("ns", "d/") is None and cache.get_listing("ns", "") is None
    assert cache.get_listing("ns", "d/y/") is not None and cache.get_listing("ns", "e/") is not None


def test_zero_ttl_caches_nothing_and_size_is_bounded() -> None:
    assert MetadataCache(ttl=0, negative_ttl=0).get_stat("ns", "k") is None
    off = MetadataCache(ttl=0, negative_ttl=0)
    off.put_stat("ns", "k", ObjectInfo("k", 1, 0.0))
    assert off.get_stat("ns", "k") is None
    small = MetadataCache(max_entries=100)
    for i in range(1000):
        small.put_stat("ns", f"k{i}", ObjectInfo(f"k{i}", 1, 0.0))
    assert small.sizes()["stats"] == 100
    assert small.get_stat("ns", "k999") is not None and small.get_stat("ns", "k0") is None


def test_a_value_fetched_across_an_invalidation_is_not_cached() -> None:
    from objstore.base import ListPage, ObjectInfo
    from pcache.metacache import MetadataCache

    cache = MetadataCache(ttl=60.0)
    before = cache.generation
    cache.invalidate("ns", "dir/new.bin")  # an upload landed while a listing was being fetched
    stale = ListPage([], [], None)
    assert not cache.put_listing("ns", "dir/", stale, "/", before)
    assert cache.get_listing("ns", "dir/") is None  # the next lister fetches again
    assert not cache.put_stat("ns", "dir/new.bin", ObjectInfo("dir/new.bin", 1, 0.0), before)
    now = cache.generation
    assert cache.put_listing("ns", "dir/", stale, "/", now)
    assert cache.get_listing("ns", "dir/") == stale


def test_invalidating_one_key_drops_it_and_its_parents_listings_only() -> None:
    from objstore.base import ListPage, ObjectInfo
    from pcache.metacache import MetadataCache

    cache = MetadataCache(ttl=60)
    for key in ("d/x", "d/x2", "d/sub/y"):
        cache.put_stat("ns", key, ObjectInfo(key, 1, 0.0, "e"))
    for prefix in ("", "d/", "d/sub/", "other/"):
        cache.put_listing("ns", prefix, ListPage([], [], None))
    cache.invalidate_key("ns", "d/x")
    assert cache.get_stat("ns", "d/x") is None
    assert cache.get_stat("ns", "d/x2") is not None  # not a prefix match
    assert cache.get_listing("ns", "") is None and cache.get_listing("ns", "d/") is None
    assert cache.get_listing("ns", "d/sub/") is not None
    assert cache.get_listing("ns", "other/") is not None


def _keys(page: ListPage | None) -> tuple[list[str], list[str]]:
    assert page is not None
    return [o.key for o in page.objects], page.prefixes


def test_landed_changes_patch_the_parent_listings() -> None:
    clock = Clock()
    cache = MetadataCache(ttl=30, negative_ttl=5, clock=clock)
    cache.put_listing("ns", "d/", ListPage([ObjectInfo("d/b", 1, 0.0)], [], None))
    cache.put_listing("ns", "", ListPage([], ["d/"], None))
    cache.put_listing("ns", "d/", ListPage([ObjectInfo("d/b", 1, 0.0)], [], None), "")
    held = cache.get_listing("ns", "d/")
    cache.landed("ns", "d/a", ObjectInfo("d/a", 2, 0.0, "e"))
    cache.landed("ns", "d/s/x", ObjectInfo("d/s/x", 3, 0.0, "e"))
    assert _keys(cache.get_listing("ns", "d/")) == (["d/a", "d/b"], ["d/s/"])
    assert _keys(cache.get_listing("ns", "d/", "")) == (["d/a", "d/b", "d/s/x"], [])
    assert _keys(cache.get_listing("ns", "")) == ([], ["d/"])
    assert _keys(held) == (["d/b"], [])  # a reader's page is never changed under it
    assert cache.get_stat("ns", "d/a") == ObjectInfo("d/a", 2, 0.0, "e")
    cache.landed("ns", "d/a", ObjectInfo("d/a", 7, 0.0, "f"))  # replaced in place, not doubled
    page = cache.get_listing("ns", "d/")
    assert page is not None and [(o.key, o.size) for o in page.objects] == [("d/a", 7), ("d/b", 1)]
    cache.landed("ns", "d/b", None)
    assert _keys(cache.get_listing("ns", "d/")) == (["d/a"], ["d/s/"])
    assert cache.get_stat("ns", "d/b") is MISSING
    cache.landed("ns", "d/s/x", None)  # was it the last key under d/s/? only a listing knows
    assert cache.get_listing("ns", "d/") is None
    assert _keys(cache.get_listing("ns", "d/", "")) == (["d/a"], [])


def test_a_forgotten_stat_keeps_the_listings() -> None:
    cache = MetadataCache(ttl=30, negative_ttl=5, clock=Clock())
    cache.put_listing("ns", "d/", ListPage([], [], None))
    cache.put_stat("ns", "d/a", MISSING)
    before = cache.generation
    cache.forget_stat("ns", "d/a")
    assert cache.get_stat("ns", "d/a") is None and cache.get_listing("ns", "d/") is not None
    assert cache.generation > before  # a fetch under way when it changed is not cached


def test_stale_entries_are_kept_for_serve_stale_and_only_given_when_asked() -> None:
    clock = Clock()
    cache = MetadataCache(ttl=10, negative_ttl=2, clock=clock, serve_stale=100)
    info = ObjectInfo("d/a", 1, 0.0, "e")
    cache.put_stat("ns", "d/a", info)
    cache.put_stat("ns", "d/gone", MISSING)
    cache.put_listing("ns", "d/", ListPage([info], [], None))
    clock.now = 50.0
    assert cache.get_stat("ns", "d/a") is None and cache.get_listing("ns", "d/") is None
    assert cache.stale_stat("ns", "d/a") == info and cache.stale_stat("ns", "d/gone") is MISSING
    assert _keys(cache.stale_listing("ns", "d/")) == (["d/a"], [])
    cache.invalidate_key("ns", "d/a")  # an invalidation drops the stale answers too
    assert cache.stale_stat("ns", "d/a") is None and cache.stale_listing("ns", "d/") is None
    clock.now = 103.0  # past TTL + serve_stale
    assert cache.stale_stat("ns", "d/gone") is None
    off = MetadataCache(ttl=10, negative_ttl=2, clock=clock)  # serve_stale 0: never
    off.put_stat("ns", "k", info)
    clock.now += 11
    assert off.stale_stat("ns", "k") is None


def test_a_probe_is_dropped_by_changes_under_it() -> None:
    from pcache.metacache import PROBE

    cache = MetadataCache(ttl=30, negative_ttl=5, clock=Clock())
    page = ListPage([ObjectInfo("d/a", 1, 0.0)], ["d/s/"], "more")
    cache.put_listing("ns", "d/", page, PROBE)
    assert cache.get_listing("ns", "d/", PROBE) is page
    cache.landed("ns", "d/b", ObjectInfo("d/b", 1, 0.0))
    assert cache.get_listing("ns", "d/", PROBE) is None
    cache.put_listing("ns", "d/", page, PROBE)
    cache.invalidate_key("ns", "d/s/x")
    assert cache.get_listing("ns", "d/", PROBE) is None


def test_only_changes_that_touch_a_fetch_keep_it_out_of_the_cache() -> None:
    """A fetch is refused for a change of its own key or directory, not for any change."""
    cache = MetadataCache(ttl=60.0)
    before = cache.generation
    cache.invalidate_key("ns", "other/x")  # elsewhere: both fetches are still good
    cache.forget_stat("ns", "d/a")  # journalled here: laid over listings, so only the stat
    cache.invalidate("ns", "e/")
    assert cache.put_stat("ns", "d/b", ObjectInfo("d/b", 1, 0.0, "e"), before)
    assert not cache.put_stat("ns", "d/a", ObjectInfo("d/a", 1, 0.0, "e"), before)
    assert not cache.put_stat("ns", "e/z", ObjectInfo("e/z", 1, 0.0, "e"), before)
    assert cache.put_listing("ns", "d/", ListPage([], [], None), "/", before) is not None
    assert cache.put_listing("ns", "e/", ListPage([], [], None), "/", before) is None
    assert cache.put_listing("ns", "", ListPage([], [], None), "/", before) is None  # shows e/
    assert cache.put_stat("ns", "d/c", MISSING, before) and cache.put_stat("ns", "x", MISSING, 0)


def test_a_listing_fetched_while_changes_landed_is_cached_with_them() -> None:
    cache = MetadataCache(ttl=60.0)
    before = cache.generation
    cache.landed("ns", "d/new", ObjectInfo("d/new", 1, 0.0, "e"))
    cache.landed("ns", "d/gone", None)
    fetched = ListPage(
        [ObjectInfo("d/gone", 1, 0.0, "e"), ObjectInfo("d/old", 1, 0.0, "e")], [], None
    )
    cached = cache.put_listing("ns", "d/", fetched, "/", before)
    assert _keys(cached) == (["d/new", "d/old"], [])
    assert _keys(cache.get_listing("ns", "d/")) == (["d/new", "d/old"], [])
    cache.invalidate_key("ns", "d/other")  # what it became is unknown: fetched again
    assert cache.put_listing("ns", "d/", fetched, "/", before) is None


def test_a_fetch_older_than_the_change_log_is_not_cached() -> None:
    from pcache.metacache import CHANGE_LOG

    cache = MetadataCache(ttl=60.0)
    before = cache.generation
    for i in range(CHANGE_LOG + 1):
        cache.forget_stat("ns", f"far/{i}")
    assert not cache.put_stat("ns", "d/a", MISSING, before)
    assert cache.put_listing("ns", "d/", ListPage([], [], None), "/", before) is None


def test_a_fresh_listing_answers_for_new_names_where_this_node_writes() -> None:
    """Bulk creates: in a directory written through this node, a listing younger than the
    negative TTL says which names are not there; anywhere else each name is asked for."""
    clock = Clock()
    cache = MetadataCache(ttl=30, negative_ttl=5, clock=clock)
    page = ListPage([ObjectInfo("d/a", 1, 0.0, "e")], ["d/sub/"], None)
    cache.put_listing("ns", "d/", page)
    assert not cache.absent("ns", "d/new")  # nothing written there: the store is asked
    cache.forget_stat("ns", "d/b")  # a file journalled there
    assert cache.absent("ns", "d/new") and cache.absent("ns", "d/new/")
    assert cache.get_stat("ns", "d/new") is MISSING  # as a lookup's negative entry
    assert not cache.absent("ns", "d/a") and not cache.absent("ns", "d/sub/")
    assert cache.absent("ns", "d/sub")  # the object d/sub: only the prefix is there
    assert not cache.absent("ns", "e/new") and not cache.absent("ns", "new")  # no listing
    assert cache.to_refresh("ns", "d/new") is None  # still fresh
    clock.now = 5.5
    assert not cache.absent("ns", "d/new2")  # older than the negative TTL
    assert cache.to_refresh("ns", "d/new2") is None  # and nothing written for 5 s
    cache.landed("ns", "d/b", ObjectInfo("d/b", 1, 0.0, "e"))
    assert cache.to_refresh("ns", "d/new2") == "d/"
    assert cache.to_refresh("ns", "d/a") is None  # listed: most likely there, asked for itself
    cache.put_listing("ns", "d/", page)
    assert cache.absent("ns", "d/new2") and cache.to_refresh("ns", "d/new2") is None
    truncated = ListPage([ObjectInfo("d/a", 1, 0.0, "e")], [], "token")
    cache.put_listing("ns", "d/", truncated)
    assert not cache.absent("ns", "d/new3")  # a page of a longer listing proves nothing


def test_a_marker_made_here_makes_its_own_directory_written_into() -> None:
    clock = Clock()
    cache = MetadataCache(ttl=30, negative_ttl=5, clock=clock)
    cache.put_listing("ns", "new/", ListPage([], [], None))  # the mkdir's probe: nothing there
    cache.forget_stat("ns", "new/")  # mkdir journals the marker
    assert cache.absent("ns", "new/file")
    strict = MetadataCache(ttl=30, negative_ttl=0, clock=clock)
    strict.put_listing("ns", "new/", ListPage([], [], None))
    strict.forget_stat("ns", "new/")
    assert not strict.absent("ns", "new/file") and strict.to_refresh("ns", "new/f") is None


def test_a_directory_found_absent_where_this_node_writes_answers_for_its_names() -> None:
    """A tree being unpacked without markers: a sub-directory (and the ones below it) that the
    fresh listing of a directory written here does not show is empty, as of that listing, once
    a name in it is asked; its names are answered from it (one store request per tree, not two
    per file). A name asked for as a possible directory (``d/f1/``, every lookup's probe) makes
    no listing of its own."""
    clock = Clock()
    cache = MetadataCache(ttl=30, negative_ttl=5, clock=clock)
    cache.put_listing("ns", "d/", ListPage([ObjectInfo("d/a", 1, 0.0, "e")], ["d/old/"], None))
    assert not cache.absent("ns", "d/new/f1")  # nothing written in d/: asked
    cache.forget_stat("ns", "d/a")
    assert not cache.absent("ns", "d/old/f1")  # d/old/ is there: its own listing is needed
    assert cache.get_listing("ns", "d/old/") is None
    clock.now = 2.0
    assert cache.absent("ns", "d/f2/")  # a lookup's probe of a new file: nothing cached for it
    assert cache.get_listing("ns", "d/f2/") is None
    assert cache.absent("ns", "d/new/deeper/f2")  # mkdir -p d/new/deeper, then a file in it
    assert _keys(cache.get_listing("ns", "d/new/")) == ([], [])
    assert _keys(cache.get_listing("ns", "d/new/deeper/")) == ([], [])
    assert cache.absent("ns", "d/new/f1") and cache.to_list("ns", "d/new/f3") is None
    clock.now = 5.5  # as fresh as d/'s listing (fetched at 0), not as the question
    assert not cache.absent("ns", "d/new/f3")
    assert cache.to_refresh("ns", "d/new/f3") == "d/new/"  # listed again, once
    strict = MetadataCache(ttl=30, negative_ttl=0, clock=clock)
    strict.put_listing("ns", "d/", ListPage([], [], None))
    strict.forget_stat("ns", "d/a")
    assert not strict.absent("ns", "d/new/f")


def test_a_directory_written_here_without_a_listing_is_worth_listing_once() -> None:
    clock = Clock()
    cache = MetadataCache(ttl=30, negative_ttl=5, clock=clock)
    assert cache.to_list("ns", "d/new") is None  # nothing written in d/
    cache.forget_stat("ns", "d/a")
    assert cache.to_list("ns", "d/new") == "d/"
    cache.too_long_to_list("ns", "d/")  # more than one page: names asked one by one
    assert cache.to_list("ns", "d/new") is None
    clock.now = 31.0  # for ttl seconds
    cache.forget_stat("ns", "d/a")
    assert cache.to_list("ns", "d/new") == "d/"
    cache.put_listing("ns", "d/", ListPage([], [], None))
    assert cache.to_list("ns", "d/new") is None and cache.absent("ns", "d/new")
    assert MetadataCache(ttl=30, negative_ttl=0, clock=clock).to_list("ns", "d/new") is None


def test_the_cache_is_saved_and_taken_back_with_the_ttl_it_had_left(tmp_path) -> None:
    """A restarted worker: what was cached comes back from disk with its remaining TTL and
    fetch time; what expired, was invalidated or was evicted does not."""
    from pcache.metastore import MetadataStore

    clock = Clock()
    cache = MetadataCache(ttl=30, negative_ttl=5, clock=clock, serve_stale=0)
    store = MetadataStore(tmp_path / "meta")
    full = ObjectInfo("d/a", 3, 1.5, "e1", metadata={"mode": "33188", "ü": "é"})
    cache.put_stat("ns", "d/a", full)
    cache.put_stat("ns", "d/gone", MISSING)
    cache.put_stat("ns", "d/l", ObjectInfo("d/l", 1, 0.0, "e2"), listed=True)
    cache.put_stat("ns", "d/x", ObjectInfo("d/x", 1, 0.0, "e3"))
    cache.put_listing("ns", "d/", ListPage([full], ["d/s/"], None))
    long_key = "k/" + "x" * 1000  # longer than an LMDB key
    cache.put_stat("ns", long_key, ObjectInfo(long_key, 1, 0.0, "e4"))
    assert cache.save(store) == 6
    cache.invalidate_key("ns", "d/x")
    assert cache.save(store) == 2  # the removal, and the parent listing it dropped
    store.close()

    again = MetadataCache(ttl=30, negative_ttl=5, clock=Clock())
    assert again.load(MetadataStore(tmp_path / "meta")) == 4
    # wall-clock time moved ~0 s here: each keeps what it had left (expiry is tested below)
    assert again.get_stat("ns", "d/a", full=True) == full
    assert again.get_stat("ns", "d/l", full=True) is None and again.get_stat("ns", "d/l")
    assert again.get_stat("ns", "d/x") is None and again.get_stat("ns", "d/gone") is MISSING
    assert again.get_stat("ns", long_key) is not None
    assert again.get_listing("ns", "d/") is None  # dropped by the invalidation of d/x


def test_pages_of_long_listings_are_saved_and_taken_back(tmp_path) -> None:
    """A restarted worker pages through a long listing it knew without asking the store; a
    page a change dropped before the save does not come back."""
    from pcache.metastore import MetadataStore

    cache = MetadataCache(ttl=30, negative_ttl=5, clock=Clock())
    store = MetadataStore(tmp_path / "meta")
    first = ListPage([ObjectInfo("big/a", 1, 2.5, "e1")], ["big/s/"], "big/s/")
    second = ListPage([ObjectInfo("big/z", 2, 0.0, "e2")], [], None)
    other = ListPage([ObjectInfo("o/a", 1, 0.0, "e3")], [], "o/a")
    assert cache.put_page("ns", PageAt("big/", "/", "", 2), first, cache.generation)
    assert cache.put_page("ns", PageAt("big/", "/", "big/s/", 2), second, cache.generation)
    assert cache.put_page("ns", PageAt("o/", "/", "", 1), other, cache.generation)
    assert cache.save(store) == 3
    cache.landed("ns", "o/b", ObjectInfo("o/b", 1, 0.0, "e4"))  # drops o/'s pages
    cache.save(store)
    store.close()
    again = MetadataCache(ttl=30, negative_ttl=5, clock=Clock())
    again.load(MetadataStore(tmp_path / "meta"))
    assert again.get_page("ns", PageAt("big/", "/", "", 2)) == first
    assert again.get_page("ns", PageAt("big/", "/", "big/s/", 2)) == second
    assert again.get_page("ns", PageAt("o/", "/", "", 1)) is None
    assert again.sizes()["pages"] == 2


def test_a_saved_listing_keeps_its_fetch_time_and_expires_on_the_wall_clock(
    tmp_path, monkeypatch
) -> None:
    import time as real_time

    from pcache.metastore import MetadataStore

    cache = MetadataCache(ttl=30, negative_ttl=5, clock=Clock())
    cache.put_listing("ns", "d/", ListPage([], [], None))
    cache.forget_stat("ns", "d/b")  # written into
    store = MetadataStore(tmp_path / "meta")
    cache.save(store)
    wall = real_time.time()
    monkeypatch.setattr("pcache.metacache.time.time", lambda: wall + 20)
    later = MetadataCache(ttl=30, negative_ttl=5, clock=Clock())
    later.load(store)
    assert later.get_listing("ns", "d/") is not None  # 10 s of its TTL left
    later.forget_stat("ns", "d/b")
    assert not later.absent("ns", "d/new")  # fetched 20 s ago: too old to answer for names
    monkeypatch.setattr("pcache.metacache.time.time", lambda: wall + 31)
    gone = MetadataCache(ttl=30, negative_ttl=5, clock=Clock())
    assert gone.load(store) == 0


def test_an_unreadable_metadata_store_starts_cold(tmp_path) -> None:
    from pcache.metastore import MetadataStore

    path = tmp_path / "meta"
    path.mkdir()
    (path / "data.mdb").write_bytes(b"not an lmdb file" * 100)
    store = MetadataStore(path)
    assert list(store.load()) == []
    cache = MetadataCache(ttl=30)
    cache.put_stat("ns", "k", ObjectInfo("k", 1, 0.0, "e"))
    assert cache.save(store) == 1 and len(list(store.load())) == 1


def test_pages_of_a_long_listing_are_cached_bounded_and_dropped_by_changes() -> None:
    from pcache.metacache import PAGES_MAX

    clock = Clock()
    cache = MetadataCache(ttl=30, negative_ttl=5, clock=clock, serve_stale=100)
    first = ListPage([ObjectInfo("d/a", 1, 0.0)], [], "d/a")
    second = ListPage([ObjectInfo("d/b", 1, 0.0)], [], None)
    generation = cache.generation
    assert cache.put_page("ns", PageAt("d/", "/", "", 1), first, generation)
    assert cache.put_page("ns", PageAt("d/", "/", "d/a", 1), second, generation)
    assert cache.get_page("ns", PageAt("d/", "/", "", 1)) == first
    assert cache.get_page("ns", PageAt("d/", "/", "d/a", 1)) == second
    assert cache.get_page("ns", PageAt("d/", "/", "", 2)) is None  # another page size: another page
    assert cache.get_page("ns", PageAt("d/", "", "", 1)) is None  # another delimiter too
    assert cache.get_listing("ns", "d/") is None  # a page is not the whole listing
    # a change that lands in the directory drops every page of it; elsewhere none
    cache.landed("ns", "e/x", ObjectInfo("e/x", 1, 0.0))
    assert cache.get_page("ns", PageAt("d/", "/", "", 1)) == first
    cache.landed("ns", "d/c", ObjectInfo("d/c", 1, 0.0))
    assert cache.get_page("ns", PageAt("d/", "/", "", 1)) is None
    assert cache.get_page("ns", PageAt("d/", "/", "d/a", 1)) is None
    # nor is a page fetched across such a change cached (pages are not patched)
    generation = cache.generation
    cache.invalidate_key("ns", "d/z")
    assert not cache.put_page("ns", PageAt("d/", "/", "", 1), first, generation)
    assert cache.get_page("ns", PageAt("d/", "/", "", 1)) is None
    assert cache.put_page("ns", PageAt("d/", "/", "", 1), first, cache.generation)
    cache.invalidate("ns", "d/")
    assert cache.get_page("ns", PageAt("d/", "/", "", 1)) is None
    # past the TTL a page is stale: given only when asked so (the store is down)
    assert cache.put_page("ns", PageAt("d/", "/", "", 1), first, cache.generation)
    clock.now = 31.0
    assert cache.get_page("ns", PageAt("d/", "/", "", 1)) is None
    assert cache.get_page("ns", PageAt("d/", "/", "", 1), stale=True) == first
    # bounded: the least recently used page goes first
    for n in range(PAGES_MAX + 5):
        cache.put_page("ns", PageAt("big/", "/", f"k{n:05d}", 1000), first, cache.generation)
    assert cache.sizes()["pages"] == PAGES_MAX
    assert cache.get_page("ns", PageAt("big/", "/", "k00000", 1000)) is None
    assert cache.get_page("ns", PageAt("big/", "/", f"k{PAGES_MAX + 4:05d}", 1000)) == first
