"""pcache.keyindex.PrefixIndex against a plain set scanned in full (the reference)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pcache.keyindex import PrefixIndex

keys = st.text(alphabet="ab/é", max_size=5)
ops = st.lists(st.tuples(st.booleans(), st.sampled_from(["n1", "n2"]), keys), max_size=60)


@given(ops, st.sampled_from(["n1", "n2"]), keys)
def test_under_matches_a_full_scan(
    steps: list[tuple[bool, str, str]], ns: str, prefix: str
) -> None:
    index = PrefixIndex()
    reference: set[tuple[str, str]] = set()
    for add, namespace, key in steps:
        if add:
            index.add(namespace, key)
            reference.add((namespace, key))
        else:
            index.discard(namespace, key)
            reference.discard((namespace, key))
    expected = sorted(k for n, k in reference if n == ns and k.startswith(prefix))
    assert index.under(ns, prefix) == expected
    assert len(index) == len(reference)


def test_empty_and_unknown_namespaces() -> None:
    index = PrefixIndex()
    assert index.under("ns", "") == [] and len(index) == 0
    index.discard("ns", "missing")  # nothing to drop: no error
    index.add("ns", "d/a")
    index.add("ns", "d/a")  # once
    index.add("ns", "e")
    assert index.under("ns", "d/") == ["d/a"] and index.under("ns", "") == ["d/a", "e"]
    assert index.under("other", "") == []
