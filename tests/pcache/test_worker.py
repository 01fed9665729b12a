"""Real workers over the real S3 server: hits, misses, peers, eviction, corruption, faults,
write-back across restarts, authentication and key safety."""

from __future__ import annotations

import json
import os
import resource
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from objstore.errors import InvalidKey, ObjectNotFound
from pcache.blockindex import BlockId
from pcache.client import PcacheClient, WorkerUnavailable
from pcache.config import ClientConfig
from pcache.localcache import LocalCacheReader, open_files_limit, raise_open_files_limit
from pcache.protocol import Resolved, Unauthorized
from tests.pcache.conftest import MiB, disk_usage
from tests.servers.proxies import FaultProxy
from tests.servers.s3_process import free_port


def _get(url: str, token: str | None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_miss_then_hit(make_cluster, payload) -> None:
    cluster, store = make_cluster(1)
    data = payload(5 * MiB + 123)
    store.put("dir/obj.bin", data)
    client = make_cluster.client(cluster)
    assert client.read("data/dir/obj.bin") == data
    first = client.status()["reads"]["by_tier"]
    assert first["backend"] == 6 and first["local"] == 0
    assert client.read("data/dir/obj.bin") == data  # straight from the cache files
    assert client.reads.sources.get("local", 0) >= 6
    client.reads.report_hits()  # what eviction and the worker's counters must learn about
    second = client.status()["reads"]["by_tier"]
    assert second["backend"] == 6 and second["local"] == 6
    # ranged reads straddling blocks
    assert client.read("data/dir/obj.bin", MiB - 10, 20) == data[MiB - 10 : MiB + 10]
    assert client.read("data/dir/obj.bin", 5 * MiB, 1000) == data[5 * MiB :]


def test_missing_object_and_namespace(make_cluster) -> None:
    cluster, _ = make_cluster(1)
    client = make_cluster.client(cluster)
    with pytest.raises(FileNotFoundError, match="no such object"):
        client.read("data/nope.bin")
    with pytest.raises(FileNotFoundError, match="unknown namespace"):
        client.read("other/x.bin")


def test_token_required(make_cluster) -> None:
    cluster, store = make_cluster(1)
    store.put("a.bin", b"x")
    address = cluster.nodes[0].address
    assert _get(f"{address}/v1/stat/data/a.bin", None)[0] == 401
    status, body = _get(f"{address}/v1/stat/data/a.bin", "wrong-token")
    assert status == 401 and b"token" in body
    assert _get(f"{address}/v1/stat/data/a.bin", cluster.token)[0] == 200
    assert _get(f"{address}/healthz", None)[0] == 200
    bad = make_cluster.client(cluster)
    bad.http.headers["Authorization"] = "Bearer nope"
    with pytest.raises(Unauthorized):
        bad.stat("data/a.bin")


def test_escaping_keys_refused(make_cluster) -> None:
    cluster, _ = make_cluster(1)
    client = make_cluster.client(cluster)
    address = cluster.nodes[0].address
    for key in ("../../etc/passwd", "a/../../b", "%2E%2E/x"):
        status, body = _get(f"{address}/v1/stat/data/{key}", cluster.token)
        assert status in (400, 404), (key, status)
        if status == 404:  # aiohttp normalised the path away: it never reached a handler
            assert b"no such object" not in body
    status, body = _get(f"{address}/v1/block/data/..%2Fx?version=v&index=0&size=1", cluster.token)
    assert status == 400 and b"'..'" in body
    with pytest.raises(InvalidKey):
        client.put("data/../escape.bin", b"x")
    with pytest.raises(InvalidKey):
        client.stat("data/a/../../b")
    for d in cluster.nodes[0].root.rglob("*"):
        assert "escape" not in d.name


def test_concurrent_misses_coalesce(make_cluster, payload) -> None:
    cluster, store = make_cluster(1)
    data = payload(MiB)
    store.put("hot.bin", data)
    clients = [make_cluster.client(cluster) for _ in range(6)]
    results: list[bytes] = []
    barrier = threading.Barrier(len(clients))

    def read(c: PcacheClient) -> None:
        barrier.wait()
        results.append(c.read("data/hot.bin"))

    threads = [threading.Thread(target=read, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [data] * 6
    reads = clients[0].status()["reads"]
    assert reads["by_tier"]["backend"] == 1  # one fetch, however many readers
    assert reads["coalesced"] + reads["by_tier"]["local"] == 5


def test_peer_tier(make_cluster, payload) -> None:
    cluster, store = make_cluster(2)
    data = payload(8 * MiB)
    store.put("shared.bin", data)
    one = make_cluster.client(cluster, 0)
    # warm: each block lands on the node rendezvous hashing makes its owner
    result = one.warmup("data/shared.bin")
    assert result["blocks_by_source"] == {"backend": 8}
    owners = {
        n["node_id"]: n["blocks"]["blocks"] for n in (one.status(a.address) for a in cluster.nodes)
    }
    assert sum(owners.values()) == 8 and all(v > 0 for v in owners.values()), owners
    # ask each node for every block directly: what it lacks comes from its peer, not S3
    info = one.stat("data/shared.bin")
    sources = []
    for node in cluster.nodes:
        for index in range(8):
            response = one.http.request(
                "GET",
                node.address,
                "/v1/block/data/shared.bin",
                fields={"version": info.version, "index": str(index), "size": str(info.size)},
            )
            assert response.data == data[index * MiB : (index + 1) * MiB]
            sources.append(response.header("X-Pcache-Source"))
    assert sources.count("peer") == 8 and sources.count("local") == 8
    total_backend = sum(one.status(n.address)["reads"]["by_tier"]["backend"] for n in cluster.nodes)
    assert total_backend == 8


def test_eviction_never_exceeds_capacity(make_cluster, payload) -> None:
    cluster, store = make_cluster(1, capacity=6 * MiB, readahead_blocks=0)
    objects = {f"obj-{i}.bin": payload(3 * MiB) for i in range(6)}  # 18 MiB through a 6 MiB cache
    for key, data in objects.items():
        store.put(key, data)
    client = make_cluster.client(cluster)
    disk = cluster.nodes[0].root / "disk0"
    peak = 0
    stop = threading.Event()
    watcher_client = make_cluster.client(cluster)

    def watch() -> None:
        # a directory walk is not a snapshot (it can see an evicted file and its replacement),
        # so during the run sample the worker's accounting; the files are checked at rest
        nonlocal peak
        while not stop.is_set():
            d = watcher_client.status()["disks"][0]
            peak = max(peak, d["used"] + d["reserved"])
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(2):
            for key, data in objects.items():
                assert client.read(f"data/{key}") == data
    finally:
        stop.set()
        watcher.join()
    status = client.status()
    assert status["blocks"]["evictions"] > 0
    assert 0 < peak <= 6 * MiB, peak
    on_disk = disk_usage(disk / "blocks")
    assert on_disk <= 6 * MiB
    assert on_disk == status["disks"][0]["used"]


def test_corrupt_block_is_refetched(make_cluster, payload) -> None:
    cluster, store = make_cluster(1)
    data = payload(2 * MiB)
    store.put("c.bin", data)
    client = make_cluster.client(cluster)
    assert client.read("data/c.bin") == data
    files = sorted((cluster.nodes[0].root / "disk0").rglob("*.blk"))
    assert len(files) == 2
    for file in files:  # flip one byte near the end of each block's data
        raw = bytearray(file.read_bytes())
        raw[-100] ^= 0xFF
        file.write_bytes(bytes(raw))
    assert client.read("data/c.bin") == data
    status = client.status()
    assert status["blocks"]["corrupt"] == 2
    assert status["reads"]["by_tier"]["backend"] == 4


def test_restart_with_full_cache_serves_hits(make_cluster, payload) -> None:
    cluster, store = make_cluster(1)
    data = payload(4 * MiB)
    store.put("warm.bin", data)
    client = make_cluster.client(cluster)
    assert client.read("data/warm.bin") == data
    cluster.kill(cluster.nodes[0])
    cluster.start(cluster.nodes[0])
    fresh = make_cluster.client(cluster)
    assert fresh.read("data/warm.bin") == data
    tiers = fresh.status()["reads"]["by_tier"]
    assert tiers["local"] == 4 and tiers["backend"] == 0


def test_peer_killed_mid_read(make_cluster, payload) -> None:
    cluster, store = make_cluster(3, readahead_blocks=0)
    data = payload(24 * MiB)
    store.put("big.bin", data)
    client = make_cluster.client(cluster, 0)
    victim = cluster.nodes[2]
    with client.open("data/big.bin") as reader:
        first = reader.read(6 * MiB)
        cluster.kill(victim)
        rest = reader.read()
    assert first + rest == data
    dead = [p for p in client.selector.snapshot() if p["id"] == victim.node_id]
    assert dead and dead[0]["state"] == "dead"


def test_all_workers_dead_reads_backing_store(
    make_cluster, payload, rclone_s3, monkeypatch
) -> None:
    cluster, store = make_cluster(1)
    data = payload(2 * MiB)
    store.put("x.bin", data)
    client = make_cluster.client(cluster, direct_reads=False)
    assert client.read("data/x.bin", 0, 10) == data[:10]  # the client learns the cluster
    info = client.stat("data/x.bin")
    cluster.kill(cluster.nodes[0])
    monkeypatch.setenv("PCACHE_CONFIG", str(cluster.nodes[0].config_path))
    buf = bytearray(info.size)
    assert client.readinto("data/x.bin", 0, buf, info) == info.size
    assert bytes(buf) == data
    assert client.reads.sources.get("direct") == 2


def test_a_cache_file_damaged_under_an_open_reader_is_not_served(make_cluster, payload) -> None:
    cluster, store = make_cluster(1)
    data = payload(300_000)  # one block
    store.put("bad.bin", data)
    client = make_cluster.client(cluster)
    client.warmup("data/bad.bin")
    assert client.read("data/bad.bin", 1000, 10) == data[1000:1010]  # its file is now held open
    (block,) = [p for p in cluster.nodes[0].root.rglob("*.blk")]
    with open(block, "r+b") as file:  # damage the held file in place (same inode)
        file.seek(4096 + 200_000)
        byte = file.read(1)
        file.seek(4096 + 200_000)
        file.write(bytes([byte[0] ^ 0xFF]))
    assert client.read("data/bad.bin") == data  # never the damaged bytes: the worker refetched
    assert client.reads.sources.get("backend", 0) >= 1


def test_cache_files_are_read_directly_and_survive_a_dead_worker(make_cluster, payload) -> None:
    cluster, store = make_cluster(1)
    data = payload(3 * MiB + 7)
    store.put("d.bin", data)
    client = make_cluster.client(cluster)
    client.warmup("data/d.bin")
    info = client.stat("data/d.bin")
    assert client.read("data/d.bin", MiB - 5, 10) == data[MiB - 5 : MiB + 5]  # a partial read
    assert client.reads.sources == {"local": 2}  # two blocks, read from the files, not the worker
    client.reads.report_hits()
    assert client.status()["reads"]["by_tier"]["local"] == 2  # the worker was told
    cluster.kill(cluster.nodes[0])
    buf = bytearray(info.size)
    assert client.readinto("data/d.bin", 0, buf, info) == info.size  # no worker needed
    assert bytes(buf) == data and client.reads.sources == {"local": 6}


def deleted_cache_files_open(root: Path) -> list[str]:
    """This process's descriptors on files under ``root`` that have been deleted."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(root)) and target.endswith("(deleted)"):
            found.append(target)
    return found


def test_evicted_files_held_open_are_closed(make_cluster, payload) -> None:
    cluster, store = make_cluster(1, capacity=6 * MiB, readahead_blocks=0)
    objects = {f"e-{i}.bin": payload(3 * MiB) for i in range(4)}
    for key, data in objects.items():
        store.put(key, data)
    client = make_cluster.client(cluster)
    reader_client = make_cluster.client(cluster)
    root = cluster.nodes[0].root
    client.warmup("data/e-0.bin")
    assert reader_client.read("data/e-0.bin", 5, 10) == objects["e-0.bin"][5:15]
    cache = reader_client.reads.local_cache()
    assert cache is not None and len(cache._open) == 1  # the block file stays open
    for key in ("e-1.bin", "e-2.bin", "e-3.bin"):  # 9 MiB more through a 6 MiB cache
        client.warmup(f"data/{key}")
    assert client.status()["blocks"]["evictions"] > 0
    assert deleted_cache_files_open(root)  # evicted, but its space is still held here
    assert cache.close_unlinked() == 1
    assert not deleted_cache_files_open(root) and not cache._open
    assert reader_client.read("data/e-3.bin", 7, 3) == objects["e-3.bin"][7:10]


def test_open_block_files_are_bounded(make_cluster, payload) -> None:
    cluster, store = make_cluster(1)
    data = payload(5 * MiB)
    store.put("b.bin", data)
    client = make_cluster.client(cluster)
    client.warmup("data/b.bin")
    layout = client.info()["local_cache"]
    cache = LocalCacheReader(layout["index"], layout["dirs"], open_files=2)
    try:
        info = client.stat("data/b.bin")
        for index in range(5):
            out = bytearray(100)
            bid = BlockId("data", info.key, info.version, index)
            assert cache.read_into(bid, memoryview(out), 10) == 100
            assert bytes(out) == data[index * MiB + 10 : index * MiB + 110]
            assert len(cache._open) == min(index + 1, 2)
    finally:
        cache.close()


def test_open_files_limit_follows_the_descriptor_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        assert open_files_limit() == 256
        assert raise_open_files_limit(4096) == min(4096, hard)
        assert open_files_limit() == min(4096, hard) // 4
        assert raise_open_files_limit(100) == min(4096, hard)  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_write_back_roundtrip(make_cluster, payload) -> None:
    cluster, store = make_cluster(2)
    data = payload(3 * MiB + 5)
    one = make_cluster.client(cluster, 0)
    with one.open("data/out/ckpt.bin", "wb") as writer:
        writer.write(data[:MiB])
        writer.write(data[MiB:])
    # read-your-writes on the writing node before the upload is known to be done
    assert one.read("data/out/ckpt.bin") == data
    info = one.flush("data/out/ckpt.bin")
    assert info.size == len(data)
    assert store.get("out/ckpt.bin") == data
    # another node sees it after flush (close-to-open through the store)
    two = make_cluster.client(cluster, 1)
    assert two.read("data/out/ckpt.bin") == data
    objects, _ = one.ls("data/out/")
    assert [o.key for o in objects] == ["out/ckpt.bin"]


def test_write_remote_durable_and_abort(make_cluster, payload) -> None:
    cluster, store = make_cluster(1)
    client = make_cluster.client(cluster)
    info = client.put("data/small.txt", b"hello", durable="remote")
    assert info.size == 5 and store.get("small.txt") == b"hello"
    with pytest.raises(RuntimeError), client.open("data/partial.bin", "wb") as writer:
        writer.write(b"half")
        raise RuntimeError("crash in the writer")
    time.sleep(0.5)
    assert not store.exists("partial.bin")
    with pytest.raises(ObjectNotFound):
        client.stat("data/partial.bin")


def test_restart_resumes_pending_uploads(make_cluster, rclone_s3, payload, tmp_path: Path) -> None:
    proxy = FaultProxy(rclone_s3.endpoint).start()
    port = int(proxy.endpoint.rsplit(":", 1)[1])
    profile = rclone_s3.profile(endpoint=proxy.endpoint, max_attempts=2, retry_deadline=2.0)
    cluster, store = make_cluster(1, profile=profile, upload_part_size="5MiB")
    client = make_cluster.client(cluster)
    client.put("data/seed.txt", b"seed", durable="remote")  # the backend works
    proxy.stop()  # the region goes away: uploads fail and are retried
    small, big = payload(100_000), payload(12 * MiB)
    client.put("data/pending/small.bin", small)  # local-durable only
    client.put("data/pending/big.bin", big)
    backlog = client.status()["writeback"]
    assert backlog["objects"] == 2
    cluster.kill(cluster.nodes[0])  # kill -9 with both uploads pending
    proxy = FaultProxy(rclone_s3.endpoint, port=port).start()
    try:
        cluster.start(cluster.nodes[0])
        fresh = make_cluster.client(cluster)
        fresh.flush("data/pending/small.bin", timeout=60)
        fresh.flush("data/pending/big.bin", timeout=60)
        assert store.get("pending/small.bin") == small
        assert store.get("pending/big.bin") == big
        assert fresh.status()["writeback"]["objects"] == 0
        staging = list((cluster.nodes[0].root / "disk0").rglob("staging/*"))
        assert staging == []
    finally:
        proxy.stop()


def test_shared_memory_read_and_write(make_cluster, payload) -> None:
    cluster, store = make_cluster(1)
    data = payload(40 * MiB + 3)
    store.put("shm.bin", data)
    client = make_cluster.client(cluster, shm_threshold=MiB)
    assert client.reads.shared_memory
    buf = bytearray(len(data))
    assert client.readinto("data/shm.bin", 0, buf) == len(data)
    assert bytes(buf) == data
    assert client.reads.sources.get("backend", 0) == 41  # blocks arrived through the segment
    out = payload(33 * MiB)
    client.put("data/shm-out.bin", out, durable="remote")
    assert store.get("shm-out.bin") == out
    http_only = make_cluster.client(cluster, shm=False)
    assert http_only.read("data/shm.bin", 7, 3 * MiB) == data[7 : 7 + 3 * MiB]


def test_metrics_and_status(make_cluster, payload) -> None:
    cluster, store = make_cluster(1)
    store.put("m.bin", payload(MiB))
    client = make_cluster.client(cluster)
    client.read("data/m.bin")
    client.read("data/m.bin")
    client.reads.report_hits()
    status, body = _get(cluster.nodes[0].address + "/metrics", cluster.token)
    assert status == 200
    text = body.decode()
    assert 'pcache_block_reads_total{tier="backend"} 1.0' in text
    assert 'pcache_block_reads_total{tier="local"} 1.0' in text
    assert "pcache_upload_backlog_bytes" in text and "pcache_disk_used_bytes" in text
    assert _get(cluster.nodes[0].address + "/metrics", None)[0] == 401
    status_json = client.status()
    assert status_json["reads"]["hit_ratio_local"] == 0.5
    json.dumps(status_json)


def test_metadata_ttl_and_invalidate(make_cluster) -> None:
    cluster, store = make_cluster(1, metadata_ttl=300.0)
    store.put("meta.txt", b"one")
    client = make_cluster.client(cluster)
    assert client.read("data/meta.txt") == b"one"
    store.put("meta.txt", b"two!")
    assert client.stat("data/meta.txt").size == 3  # cached for the TTL
    with pytest.raises(FileNotFoundError):
        client.stat("data/later.txt")
    store.put("later.txt", b"x")
    with pytest.raises(FileNotFoundError):  # negative entry, within negative_ttl
        client.stat("data/later.txt")
    result = client.invalidate("data/")
    assert result["metadata_entries"] >= 2
    assert client.read("data/meta.txt") == b"two!"
    assert client.read("data/later.txt") == b"x"


def test_membership_file_changes_at_run_time(make_cluster, tmp_path: Path) -> None:
    members = tmp_path / "members.toml"
    cluster, _ = make_cluster(1, start=False, membership_file=str(members))
    node = cluster.nodes[0]
    members.write_text(f'[[nodes]]\nid = "node1"\naddress = "{node.address}"\n')
    cluster.start()
    client = make_cluster.client(cluster)
    assert [n["id"] for n in client.info(refresh=True)["nodes"]] == ["node1"]
    members.write_text(
        f'[[nodes]]\nid = "node1"\naddress = "{node.address}"\n'
        '[[nodes]]\nid = "node9"\naddress = "http://127.0.0.1:9"\nweight = 2.0\n'
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ids = sorted(n["id"] for n in client.info(refresh=True)["nodes"])
        if ids == ["node1", "node9"]:
            break
        time.sleep(0.2)
    assert ids == ["node1", "node9"]
    members.write_text("this is not toml [[[")  # a broken edit keeps the last good list
    time.sleep(1.5)
    assert sorted(n["id"] for n in client.info(refresh=True)["nodes"]) == ["node1", "node9"]


def test_writer_mixed_write_sizes(make_cluster, payload) -> None:
    cluster, store = make_cluster(1)
    client = make_cluster.client(cluster, shm_threshold=MiB)
    pieces = [payload(1000), payload(2 * MiB), payload(10), payload(40 * MiB + 1), payload(5)]
    with client.open("data/mixed.bin", "wb") as writer:
        for piece in pieces:
            writer.write(piece)
        assert writer.tell() == sum(map(len, pieces))
    client.flush("data/mixed.bin")
    assert store.get("mixed.bin") == b"".join(pieces)


def test_listings_see_own_writes_despite_ttl(make_cluster) -> None:
    cluster, store = make_cluster(1, metadata_ttl=300.0)
    store.put("dir/a.txt", b"a")
    client = make_cluster.client(cluster)
    assert [o.key for o in client.ls("data/dir/")[0]] == ["dir/a.txt"]
    assert [o.key for o in client.ls("data/", recursive=True)[0]] == ["dir/a.txt"]
    client.put("data/dir/b.txt", b"b", durable="remote")
    assert [o.key for o in client.ls("data/dir/")[0]] == ["dir/a.txt", "dir/b.txt"]
    assert [o.key for o in client.ls("data/", recursive=True)[0]] == ["dir/a.txt", "dir/b.txt"]
    client.delete("data/dir/a.txt")
    assert [o.key for o in client.ls("data/dir/")[0]] == ["dir/b.txt"]
    store.put("dir/c.txt", b"c")  # behind the cache's back: visible after invalidate
    assert [o.key for o in client.ls("data/dir/")[0]] == ["dir/b.txt"]
    client.invalidate("data/dir/c.txt")
    assert [o.key for o in client.ls("data/dir/")[0]] == ["dir/b.txt", "dir/c.txt"]


def test_peers_found_through_dns(make_cluster, payload, tmp_path: Path) -> None:
    """``peers_dns``: the workers come from a name with one address per worker (a Kubernetes
    headless Service). The name is real DNS-through-glibc: each worker runs in a mount namespace
    whose /etc/hosts gives ``pcache-workers`` both workers' addresses."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.1 pcache-workers\n127.0.0.2 pcache-workers\n")
    port = free_port()
    private_hosts = [
        "unshare", "--mount", "--propagation", "private", "sh", "-c",
        f'mount --bind "{hosts}" /etc/hosts && exec "$@"', "sh",
    ]  # fmt: skip
    cluster, store = make_cluster(
        2,
        peers_dns=f"pcache-workers:{port}",
        peers_dns_interval=0.5,
        weight=2.0,
        load_factor=1.1,
        cluster_args={
            "hosts": ["127.0.0.1", "127.0.0.2"],
            "ports": [port, port],
            "command_prefix": private_hosts,
        },
    )
    expected = {
        "node1": (f"http://127.0.0.1:{port}", 2.0),
        "node2": (f"http://127.0.0.2:{port}", 2.0),
    }
    clients = [make_cluster.client(cluster, i) for i in (0, 1)]

    def members(client: PcacheClient) -> dict[str, tuple[str, float]]:
        return {n["id"]: (n["address"], n["weight"]) for n in client.info(refresh=True)["nodes"]}

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(members(c) != expected for c in clients):
        time.sleep(0.2)
    assert [members(c) for c in clients] == [expected, expected], cluster.logs()
    # the cluster's load cap reaches the clients' selectors
    assert clients[0].info()["load_factor"] == 1.1
    assert clients[0]._selector is not None and clients[0]._selector._load_factor == 1.1
    data = payload(3 * MiB)
    store.put("dns/obj.bin", data)
    assert clients[0].read("data/dns/obj.bin") == data
    assert clients[1].read("data/dns/obj.bin") == data
    # the second worker leaves the name (its pod is gone): the first drops it
    hosts.write_text("127.0.0.1 localhost\n127.0.0.1 pcache-workers\n")
    cluster.kill(cluster.nodes[1])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and set(members(clients[0])) != {"node1"}:
        time.sleep(0.2)
    assert members(clients[0]) == {"node1": expected["node1"]}
    assert clients[0].read("data/dns/obj.bin") == data


def test_resolve_probes_a_directory_without_listing_it(make_cluster, rclone_s3) -> None:
    """A lookup's one request: the object beside a LIST of at most two keys under ``KEY/``,
    whatever the directory holds; changes journalled here count."""
    proxy = FaultProxy(rclone_s3.endpoint).start()
    try:
        cluster, store = make_cluster(1, profile=rclone_s3.profile(endpoint=proxy.endpoint))
        for i in range(5):
            store.put(f"tree/dir/f{i}", b"x")
        store.put("tree/dir/sub/g", b"g")
        store.put("tree/file", b"file")
        client = make_cluster.client(cluster)
        proxy.request_log.clear()
        found = client.resolve("data/tree/file")
        assert found.file is not None and found.file.size == 4 and not found.directory
        directory = client.resolve("data/tree/dir")
        assert directory.file is None and directory.children and not directory.has_marker
        assert client.resolve("data/tree/dir", file=False).file is None
        missing = client.resolve("data/tree/nope")
        assert (missing.file, missing.directory, missing.marker) == (None, False, None)
        lists = [r for r in proxy.request_log if "list-type=2" in r]
        assert lists and all("max-keys=2" in r for r in lists), lists
        # tree/file/, tree/dir/ (then cached as a probe), tree/nope/
        assert len(lists) == 3
        # journalled here and refused by the store: still what this node sees
        proxy.refuse("tree/pending/")
        client.put("data/tree/pending/p", b"p")
        assert client.resolve("data/tree/pending").children
        client.delete("data/tree/dir/sub/g", durable="local")
        for i in range(5):
            client.delete(f"data/tree/dir/f{i}", durable="local")
        assert not client.resolve("data/tree/dir").directory  # every key deleted here
    finally:
        proxy.stop()


def test_listings_page_through_the_store_with_pending_changes_in_their_range(
    make_cluster,
) -> None:
    """/v1/list in pages: a directory longer than one page is paged through the store (never
    cached whole), each page with the changes journalled here that fall in its range; names
    sort as the store lists them, unicode included."""
    cluster, store = make_cluster(1)
    keys = [f"big/f{i:04d}" for i in range(900)] + ["big/sub/a", "big/ünï", "big/z/b"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: store.put(k, b"x"), keys))
    client = make_cluster.client(cluster)
    client.put("data/big/f0200x", b"new")  # journalled here, in the first page's range
    client.put("data/big/f0850x", b"new")  # in the third's
    client.delete("data/big/f0500", durable="local")  # gone here, in the second's
    seen = sorted({k if "/" not in k[4:] else "big/" + k[4:].split("/")[0] + "/" for k in keys})
    seen = sorted([*seen, "big/f0200x", "big/f0850x"])
    seen.remove("big/f0500")
    pages = list(client.iter_dir("data/big/", limit=400))
    names = [n for p in pages for n in sorted([o.key for o in p.objects] + p.prefixes)]
    assert names == seen and len(pages) == 3
    assert all(len(p.objects) + len(p.prefixes) <= 401 for p in pages)
    listing, token = client.list_page("data/big/", after="big/f0898", limit=3)
    assert [o.key for o in listing.objects] == ["big/f0899"]
    assert listing.prefixes == ["big/sub/", "big/z/"] and token == "big/z/"  # ü sorts after z
    listing, token = client.list_page("data/big/", after=token, limit=3)
    assert [o.key for o in listing.objects] == ["big/ünï"] and listing.prefixes == []
    assert token is None
    assert client.list_dir("data/big/").objects[0].key == "big/f0000"  # the whole, as before
    status = client.status()["metadata"]
    assert status["listings"] <= 1, status  # the long listing is not held whole


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_restarted_worker_answers_from_the_metadata_it_had(make_cluster, rclone_s3, how) -> None:
    """The metadata cache is on disk with its fetch times: after a restart (a stop, or a kill
    a second after the answers were cached) stats, misses and listings within their TTL are
    answered without asking the store; an invalidation before the restart holds."""
    import signal

    proxy = FaultProxy(rclone_s3.endpoint).start()
    try:
        cluster, store = make_cluster(
            1, profile=rclone_s3.profile(endpoint=proxy.endpoint), metadata_ttl=300,
            negative_ttl=300,
        )  # fmt: skip
        for i in range(5):
            store.put(f"warm/f{i}", b"x" * i)
        store.put("warm/sub/g", b"g")
        store.put("other/o", b"o")
        client = make_cluster.client(cluster)
        assert client.stat("data/warm/f3").size == 3
        assert [o.key for o in client.ls("data/warm/")[0]] == [f"warm/f{i}" for i in range(5)]
        with pytest.raises(FileNotFoundError):
            client.stat("data/warm/missing")
        assert client.stat("data/other/o").size == 1
        client.invalidate("data/other/")
        time.sleep(1.5)  # saved once a second
        cluster.kill(cluster.nodes[0], getattr(signal, how))
        cluster.start(cluster.nodes[0])
        proxy.request_log.clear()
        assert client.stat("data/warm/f3").size == 3
        assert [o.key for o in client.ls("data/warm/")[0]] == [f"warm/f{i}" for i in range(5)]
        assert client.ls("data/warm/")[1] == ["warm/sub/"]
        with pytest.raises(FileNotFoundError):
            client.stat("data/warm/missing")
        assert [r for r in proxy.request_log if "warm" in r] == []  # all from the last run
        assert client.stat("data/other/o").size == 1
        assert any("other" in r for r in proxy.request_log)  # invalidated: asked again
    finally:
        proxy.stop()


def test_new_names_in_a_directory_written_here_are_not_asked_for(make_cluster, rclone_s3) -> None:
    """Bulk creates (tar x): once a directory this node writes into has a fresh listing, each
    new name's lookup is answered here, with no request to the store; elsewhere (and after the
    negative TTL, when the directory was not listed again) each new name is asked for."""
    proxy = FaultProxy(rclone_s3.endpoint).start()
    try:
        cluster, store = make_cluster(
            1, profile=rclone_s3.profile(endpoint=proxy.endpoint), negative_ttl=2.0
        )
        client = make_cluster.client(cluster)
        assert not client.resolve("data/bulk").directory  # the mkdir's lookup: probe cached
        client.put("data/bulk/", b"")  # the marker, journalled here
        proxy.request_log.clear()
        for i in range(20):
            assert client.resolve(f"data/bulk/f{i}").file is None
            client.put(f"data/bulk/f{i}", b"x")
        assert [r for r in proxy.request_log if not r.startswith("PUT")] == []
        # a writer outside the cluster, in a directory this node does not write into
        store.put("ext/a", b"a")
        assert [o.key for o in client.ls("data/ext/")[0]] == ["ext/a"]
        store.put("ext/new", b"n")
        assert client.stat("data/ext/new").size == 1  # seen at once
        # past the negative TTL the directory is listed again (one request), not each name
        for i in range(20):
            client.flush(f"data/bulk/f{i}", timeout=30)
        time.sleep(2.2)
        client.put("data/bulk/g", b"y")
        proxy.request_log.clear()
        for i in range(5):
            assert client.resolve(f"data/bulk/h{i}").file is None
        asked = [r for r in proxy.request_log if not r.startswith("PUT")]
        assert len(asked) == 1 and "list-type=2" in asked[0] and "max-keys=2" not in asked[0]
    finally:
        proxy.stop()


def test_a_directory_written_here_is_listed_once_for_the_new_names_asked_in_it(
    make_cluster, rclone_s3
) -> None:
    """The checkpoint pattern: a file written here, then the lookups of new names beside it (the
    target of its rename): the directory, never listed here, is listed once (one page) and the
    names are answered from that, not with a HEAD each; a name it shows is asked for itself."""
    proxy = FaultProxy(rclone_s3.endpoint).start()
    try:
        cluster, store = make_cluster(1, profile=rclone_s3.profile(endpoint=proxy.endpoint))
        client = make_cluster.client(cluster)
        store.put("ckpt/old.bin", b"o")
        client.put("data/ckpt/step1.tmp", b"x")  # written here: the directory is written into
        proxy.request_log.clear()
        for name in ("step1.bin", "step2.tmp", "step2.bin"):
            with pytest.raises(FileNotFoundError):
                client.stat(f"data/ckpt/{name}")
        asked = [r for r in proxy.request_log if not r.startswith("PUT")]
        assert len(asked) == 1 and "list-type=2" in asked[0] and "max-keys=1000" in asked[0], asked
        assert client.stat("data/ckpt/old.bin").size == 1  # listed: there, asked for itself
        client.rename("data/ckpt/step1.tmp", "data/ckpt/step1.bin")
        proxy.request_log.clear()
        with pytest.raises(FileNotFoundError):
            client.stat("data/ckpt/step3.tmp")  # the rename kept the listing: still no request
        assert [r for r in proxy.request_log if not r.startswith(("PUT", "POST"))] == []
    finally:
        proxy.stop()


def test_a_directory_the_store_will_not_list_is_asked_name_by_name(make_cluster, rclone_s3) -> None:
    """Credentials with GetObject but not ListBucket: the listing for new names is refused
    once, noted, and the names are answered by HEAD as before (not an error, not asked again)."""
    proxy = FaultProxy(rclone_s3.endpoint).start()
    try:
        cluster, _store = make_cluster(1, profile=rclone_s3.profile(endpoint=proxy.endpoint))
        client = make_cluster.client(cluster)
        client.put("data/nolist/a.tmp", b"x")
        proxy.refuse("/", methods=("GET",))  # every GET: the listings (no object is read)
        proxy.request_log.clear()
        for name in ("a.bin", "b.tmp", "b.bin"):
            with pytest.raises(FileNotFoundError):
                client.stat(f"data/nolist/{name}")
        lists = [r for r in proxy.request_log if "list-type=2" in r]
        heads = [r for r in proxy.request_log if r.startswith("HEAD ") and "/nolist/" in r]
        assert len(lists) == 1 and len(heads) == 3, proxy.request_log
    finally:
        proxy.stop()


@pytest.mark.parametrize("serve_stale", [3600.0, 0.0])
def test_metadata_past_its_ttl_is_served_while_the_store_is_down(
    make_cluster, rclone_s3, payload, serve_stale: float
) -> None:
    """Stale-if-error: with the store cut off, what was cached (stats, listings, blocks) is
    still answered past its TTL, and counted; a name never seen fails; 0 turns it off."""
    proxy = FaultProxy(rclone_s3.endpoint).start()
    try:
        profile = rclone_s3.profile(endpoint=proxy.endpoint, max_attempts=2, retry_deadline=2.0)
        cluster, store = make_cluster(
            1, profile=profile, metadata_ttl=0.5, negative_ttl=0.5, serve_stale=serve_stale
        )
        data = payload(2 * MiB + 5)
        store.put("warm/a.bin", data)
        client = make_cluster.client(cluster)
        assert client.read("data/warm/a.bin") == data
        assert [o.key for o in client.ls("data/warm/")[0]] == ["warm/a.bin"]
        with pytest.raises(FileNotFoundError):
            client.stat("data/warm/missing.bin")
        assert client.resolve("data/warm").children
        proxy.outage(True)
        time.sleep(1.0)  # every entry is past its TTL
        if not serve_stale:
            with pytest.raises(OSError):
                client.stat("data/warm/a.bin")
            return
        assert client.stat("data/warm/a.bin").size == len(data)
        assert [o.key for o in client.ls("data/warm/")[0]] == ["warm/a.bin"]
        with pytest.raises(FileNotFoundError):  # a "no such object" stays one
            client.stat("data/warm/missing.bin")
        assert client.resolve("data/warm").children
        assert client.read("data/warm/a.bin") == data  # the blocks are cached
        with pytest.raises(FileNotFoundError):  # the directory's listing does not show it
            client.stat("data/warm/never-seen.bin")
        assert client.resolve("data/warm/new-dir") == Resolved(None, None, False, False)
        with pytest.raises(OSError) as never_seen:  # a directory never listed: unknown
            client.stat("data/cold/never-seen.bin")
        assert not isinstance(never_seen.value, FileNotFoundError)  # unknown, not absent
        metadata = client.status()["metadata"]
        assert metadata["stale_served"] >= 4 and metadata["store_down"] == ["data"]
        # a new name in a listed directory is written (journalled) while the store is down
        client.put("data/warm/during.bin", b"written during the outage")
        assert client.read("data/warm/during.bin") == b"written during the outage"
        proxy.outage(False)
        client.flush("data/warm/during.bin", timeout=60)  # it catches up once the store is back
        assert store.get("warm/during.bin") == b"written during the outage"
        store.put("warm/b.bin", b"new")
        client.invalidate("data/warm/")
        assert [o.key for o in client.ls("data/warm/")[0]] == [
            "warm/a.bin",
            "warm/b.bin",
            "warm/during.bin",
        ]
    finally:
        proxy.stop()


def test_uploaded_objects_stay_in_the_cache(make_cluster, payload) -> None:
    """What a node wrote is read back from its cache after the upload, not fetched again."""
    cluster, store = make_cluster(1)
    client = make_cluster.client(cluster, direct_reads=False)
    data, small = payload(3 * MiB + 5), payload(1000)
    client.put("data/made/big.bin", data)  # staged, multi-block
    client.put("data/made/small.bin", small)  # journalled with its bytes
    for key in ("data/made/big.bin", "data/made/small.bin"):
        client.flush(key, timeout=60)
    assert store.get("made/big.bin") == data
    before = client.status()["reads"]["by_tier"]
    assert client.read("data/made/big.bin") == data
    assert client.read("data/made/small.bin") == small
    after = client.status()["reads"]["by_tier"]
    assert after["backend"] == before["backend"]  # no fetch from the store
    assert after["local"] - before["local"] == 5  # 4 blocks + 1, from the cache


def test_stat_many_and_cached_pages_of_a_long_listing(make_cluster, rclone_s3) -> None:
    """/v1/stats: several keys HEADed side by side, None for one not there, full metadata;
    malformed or oversized requests are 400s. Pages of a listing too long to hold whole are
    cached one by one (paged through again: no LIST), answered past their TTL while the store
    is down, and dropped by a change landing in the directory."""
    proxy = FaultProxy(rclone_s3.endpoint).start()
    try:
        profile = rclone_s3.profile(endpoint=proxy.endpoint, max_attempts=2, retry_deadline=2.0)
        cluster, store = make_cluster(1, profile=profile, metadata_ttl=1.0, serve_stale=60)
        keys = [f"many/f{i:02d}" for i in range(25)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: store.put(k, b"x", metadata={"mode": "33152"}), keys))
        client = make_cluster.client(cluster)
        proxy.request_log.clear()
        found = client.stat_many([f"data/{k}" for k in keys[:10]] + ["data/many/nope"], full=True)
        assert found.pop("data/many/nope") is None
        assert sorted(found) == [f"data/{k}" for k in keys[:10]]
        assert all(info is not None and info.metadata["mode"] == "33152" for info in found.values())
        heads = [r for r in proxy.request_log if r.startswith("HEAD ")]
        assert len(heads) == 11, heads
        assert client.stat_many([]) == {}
        with pytest.raises(FileNotFoundError, match="unknown namespace"):
            client.stat_many(["nope/a", "nope/b"])  # the request fails, not "each missing"
        with pytest.raises(ValueError):
            client.stat_many(["data/a", "other/b"])  # one namespace per request
        for body in ([1, 2], {"keys": "many/f00"}, {"keys": [f"k{i}" for i in range(1001)]}):
            request = urllib.request.Request(
                f"{cluster.nodes[0].address}/v1/stats/data",
                data=json.dumps(body).encode(),
                headers={"Authorization": f"Bearer {cluster.token}"},
                method="POST",
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 400

        def paged() -> list[str]:
            return [o.key for p in client.iter_dir("data/many/", limit=10) for o in p.objects]

        assert paged() == keys  # 3 pages
        proxy.request_log.clear()
        assert paged() == keys
        assert not [r for r in proxy.request_log if "list-type=2" in r]  # from the cached pages
        time.sleep(1.2)  # past the TTL
        proxy.outage(True)
        assert paged() == keys  # stale pages while the store is down
        proxy.outage(False)
        store.put("many/f10x", b"new")
        client.put("data/many/f20x", b"landed")  # lands here: the directory's pages go
        client.flush("data/many/f20x")
        assert paged() == sorted([*keys, "many/f10x", "many/f20x"])
    finally:
        proxy.stop()


def test_a_client_that_never_reached_a_worker_reads_the_store_from_its_config(
    make_cluster, payload
) -> None:
    """Issue 18 item 5: the node's worker is not up (yet): a client reads the backends its
    own config file names, with that file's profiles; writes fail (they need a worker); once
    the worker answers, the client uses it."""
    cluster, store = make_cluster(1, start=False)
    data = payload(2 * MiB + 123)
    store.put("dir/x.bin", data)
    node = cluster.nodes[0]
    config = ClientConfig.load(node.config_path, env={})
    assert config.backends == {"data": cluster.backends["data"]}
    assert config.block_size == MiB and config.config_file == node.config_path
    client = PcacheClient(config)
    make_cluster.clients.append(client)
    view = client.info()
    assert view["offline"] and view["namespaces"] == ["data"] and view["nodes"] == []
    assert client.stat("data/dir/x.bin").size == len(data)
    assert client.read("data/dir/x.bin") == data
    assert client.reads.sources == {"direct": 3}
    objects, prefixes = client.ls("data/")
    assert [o.key for o in objects] == [] and prefixes == ["dir/"]
    with pytest.raises(WorkerUnavailable):
        client.put("data/new.bin", b"x")
    cluster.start()
    assert client.info(refresh=True)["node_id"] == node.node_id
    assert client.read("data/dir/x.bin", 0, 10) == data[:10]
    assert client.reads.sources.get("backend") == 1  # through the worker now


def test_a_client_with_no_worker_and_no_backends_fails_with_one_clear_error(
    make_cluster,
) -> None:
    cluster, _ = make_cluster(1, start=False)
    client = make_cluster.client(cluster)  # address and token only: nothing to fall back on
    with pytest.raises(WorkerUnavailable, match="unreachable"):
        client.info()
    with pytest.raises(WorkerUnavailable):
        client.stat("data/x.bin")


def test_a_restarted_worker_asks_its_peers_for_their_pending_changes(make_cluster) -> None:
    """Announcements live in memory: a worker restarted while another node's file waits for
    its upload asks the other nodes at start, so its clients still see (and read) the pending
    version instead of the store's until the upload lands."""
    cluster, store = make_cluster(2, upload_delay=120.0)
    store.put("p/x.bin", b"old")
    writer = make_cluster.client(cluster, 0, direct_reads=False)
    writer.put("data/p/x.bin", b"the new content")  # local-durable on node 1, not uploaded
    writer.put("data/p/fresh.bin", b"never in the store yet")
    cluster.kill(cluster.nodes[1])
    cluster.start(cluster.nodes[1])
    reader = make_cluster.client(cluster, 1, direct_reads=False)
    assert reader.stat("data/p/x.bin").size == len(b"the new content")
    assert reader.read("data/p/x.bin") == b"the new content"
    assert reader.read("data/p/fresh.bin") == b"never in the store yet"
    assert store.get("p/x.bin") == b"old"  # still pending on node 1
    writer.flush("data/p/x.bin", timeout=60)
    assert reader.read("data/p/x.bin") == b"the new content"  # from the store now


def test_the_next_page_of_a_long_listing_is_fetched_ahead(make_cluster, rclone_s3) -> None:
    """A listing read page by page: while the reader takes in one page, the worker already
    asks the store for the next, so the reader waits for the store once, not once a page;
    every store page is still asked once."""
    proxy = FaultProxy(rclone_s3.endpoint).start()
    try:
        profile = rclone_s3.profile(endpoint=proxy.endpoint)
        cluster, store = make_cluster(1, profile=profile)
        keys = [f"ahead/f{i:02d}" for i in range(25)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: store.put(k, b"x"), keys))
        client = make_cluster.client(cluster)
        proxy.request_log.clear()

        def lists() -> list[str]:
            return [r for r in proxy.request_log if "list-type=2" in r]

        first, token = client.list_page("data/ahead/", limit=10)
        assert [o.key for o in first.objects] == keys[:10] and token is not None
        deadline = time.monotonic() + 10
        while len(lists()) < 2:  # the second page, asked by nobody yet
            assert time.monotonic() < deadline, proxy.request_log
            time.sleep(0.05)
        second, token = client.list_page("data/ahead/", after=token, limit=10)
        third, last = client.list_page("data/ahead/", after=token or "", limit=10)
        assert [o.key for o in second.objects + third.objects] == keys[10:] and last is None
        time.sleep(0.3)
        assert len(lists()) == 3, lists()  # each store page once
    finally:
        proxy.stop()
