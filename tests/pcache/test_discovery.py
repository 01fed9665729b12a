"""DnsMembership on its own: lookups that fail, peers that cannot identify themselves yet,
pods replaced under the same node id (the real-DNS path runs in test_worker.py)."""

from __future__ import annotations

import asyncio

import pytest

from pcache.membership import DnsMembership, parse_dns_target


class FakeDns:
    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.fail = False

    async def __call__(self, host: str, port: int) -> list[str]:
        if self.fail:
            raise OSError("Temporary failure in name resolution")
        return list(self.addresses)


def run(membership: DnsMembership, identities: dict[str, str], down: set[str] = frozenset()) -> list[tuple[str, str]]:  # fmt: skip
    async def identify(url: str) -> tuple[str, float]:
        if url in down:
            raise ConnectionRefusedError(url)
        return identities[url], 1.0

    asyncio.run(membership.refresh(identify, force=True))
    return [(n.node_id, n.address) for n in membership.nodes()]


def test_discovery_follows_the_name(caplog: pytest.LogCaptureFixture) -> None:
    dns = FakeDns("10.0.0.1", "10.0.0.2")
    m = DnsMembership("pcache-workers", 7070, resolve=dns)
    ids = {"http://10.0.0.1:7070": "gpu-a", "http://10.0.0.2:7070": "gpu-b"}
    # a peer that does not answer yet is left out, and asked again at the next refresh
    assert run(m, ids, down={"http://10.0.0.2:7070"}) == [("gpu-a", "http://10.0.0.1:7070")]
    assert "did not identify itself" in caplog.text
    assert run(m, ids) == [("gpu-a", "http://10.0.0.1:7070"), ("gpu-b", "http://10.0.0.2:7070")]
    version = m.version
    # a failed lookup keeps the list (a DNS hiccup must not empty the cluster)
    dns.fail = True
    assert len(run(m, ids)) == 2 and m.version == version
    assert "lookup failed" in caplog.text
    # gpu-b's pod is replaced: new address, same node id -> one node, at the new address
    dns.fail = False
    dns.addresses = ["10.0.0.1", "10.0.0.9"]
    ids["http://10.0.0.9:7070"] = "gpu-b"
    assert run(m, ids) == [("gpu-a", "http://10.0.0.1:7070"), ("gpu-b", "http://10.0.0.9:7070")]
    assert m.version == version + 1
    # IPv6 addresses are bracketed in URLs
    dns.addresses = ["fd00::5"]
    assert run(m, {"http://[fd00::5]:7070": "gpu-c"}) == [("gpu-c", "http://[fd00::5]:7070")]


def test_refresh_waits_for_its_interval() -> None:
    now = [100.0]
    dns = FakeDns("10.0.0.1")
    m = DnsMembership("w", 7070, resolve=dns, interval_s=10.0, clock=lambda: now[0])

    async def identify(url: str) -> tuple[str, float]:
        return "gpu-a", 1.0

    asyncio.run(m.refresh(identify))
    assert len(m.nodes()) == 1
    dns.addresses = []
    now[0] += 5
    asyncio.run(m.refresh(identify))
    assert len(m.nodes()) == 1  # not due yet
    now[0] += 6
    asyncio.run(m.refresh(identify))
    assert m.nodes() == []


@pytest.mark.parametrize(
    ("target", "expected"),
    [("w", ("w", 7070)), ("w.ns.svc:8080", ("w.ns.svc", 8080))],
)
def test_dns_target(target: str, expected: tuple[str, int]) -> None:
    assert parse_dns_target(target, 7070) == expected


@pytest.mark.parametrize("target", ["", ":80", "w:0", "w:x", "w:70000"])
def test_bad_dns_target(target: str) -> None:
    with pytest.raises(ValueError, match="NAME or NAME:PORT"):
        parse_dns_target(target, 7070)
