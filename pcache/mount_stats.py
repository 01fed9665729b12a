"""Live statistics of one ``pcache mount``, served through its hidden control file.

Every FUSE handler is counted (calls, errors by errno, latency percentiles over the most recent
calls); reads and writes also count bytes and the sizes the kernel asked for; the client's block
counts by source (``local`` cache disk, ``peer`` cache, ``backend`` store, ``direct`` when no worker
answered) give the hit ratios. Page-cache hits never reach the mount and are not counted.

``cat MOUNTPOINT/.pcache-stats`` prints the snapshot as JSON; ``pcache stats MOUNTPOINT`` renders it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from typing import Any

CONTROL_NAME = ".pcache-stats"
RECENT_CALLS = 4096  # latency percentiles are over this many recent calls per handler
PERCENTILES = (50, 90, 99)


def percentile(sorted_values: list[float], pct: float) -> float:
    """The ``pct``-th percentile (nearest rank) of already sorted values; 0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * pct // 100))
    return sorted_values[min(len(sorted_values), int(rank)) - 1]


class _OpStats:
    __slots__ = ("calls", "errors", "recent", "total_s")

    def __init__(self) -> None:
        self.calls = 0
        self.total_s = 0.0
        self.errors: dict[str, int] = {}
        self.recent: deque[float] = deque(maxlen=RECENT_CALLS)


class MountStats:
    """Counters of one mount; thread-safe (handlers run in trio, reads in worker threads)."""

    def __init__(self, source: str, mountpoint: str = "") -> None:
        self.source = source
        self.mountpoint = mountpoint
        self.started = time.time()
        self._lock = threading.Lock()
        self._ops: dict[str, _OpStats] = {}
        self.bytes_read = 0
        self.bytes_written = 0
        self.read_sizes: dict[int, int] = {}  # request size -> count (the kernel's choice)
        self.write_sizes: dict[int, int] = {}

    def record(self, op: str, seconds: float, error: str | None = None) -> None:
        with self._lock:
            stats = self._ops.get(op)
            if stats is None:
                stats = self._ops[op] = _OpStats()
            stats.calls += 1
            stats.total_s += seconds
            stats.recent.append(seconds)
            if error is not None:
                stats.errors[error] = stats.errors.get(error, 0) + 1

    def read(self, requested: int, returned: int) -> None:
        with self._lock:
            self.bytes_read += returned
            self.read_sizes[requested] = self.read_sizes.get(requested, 0) + 1

    def wrote(self, size: int) -> None:
        with self._lock:
            self.bytes_written += size
            self.write_sizes[size] = self.write_sizes.get(size, 0) + 1

    def snapshot(self, block_sources: dict[str, int] | None = None, **extra: Any) -> dict[str, Any]:
        """Everything as plain JSON types; ``block_sources`` are the client's counts."""
        with self._lock:
            ops = {}
            for name, stats in sorted(self._ops.items()):
                recent = sorted(stats.recent)
                ops[name] = {
                    "calls": stats.calls,
                    "errors": dict(stats.errors),
                    "mean_ms": round(stats.total_s / stats.calls * 1e3, 3),
                    **{
                        f"p{pct}_ms": round(percentile(recent, pct) * 1e3, 3) for pct in PERCENTILES
                    },
                }
            read_sizes = dict(self.read_sizes)
            write_sizes = dict(self.write_sizes)
            bytes_read, bytes_written = self.bytes_read, self.bytes_written
        sources = dict(block_sources or {})
        blocks = sum(sources.values())
        return {
            "source": self.source,
            "mountpoint": self.mountpoint,
            "uptime_s": round(time.time() - self.started, 1),
            "ops": ops,
            "bytes": {"read": bytes_read, "written": bytes_written},
            "blocks_by_source": sources,
            "hit_ratio": {
                "local": sources.get("local", 0) / blocks if blocks else 0.0,
                "cluster": (sources.get("local", 0) + sources.get("peer", 0)) / blocks
                if blocks
                else 0.0,
            },
            "read_request_bytes": _size_summary(read_sizes),
            "write_request_bytes": _size_summary(write_sizes),
            **extra,
        }

    def render(self, block_sources: dict[str, int] | None = None, **extra: Any) -> bytes:
        return (json.dumps(self.snapshot(block_sources, **extra), indent=1) + "\n").encode()


def _size_summary(sizes: dict[int, int]) -> dict[str, Any]:
    count = sum(sizes.values())
    if not count:
        return {"count": 0, "max": 0, "mean": 0, "most_common": 0}
    return {
        "count": count,
        "max": max(sizes),
        "mean": round(sum(size * n for size, n in sizes.items()) / count),
        "most_common": max(sizes.items(), key=lambda item: item[1])[0],
    }


def format_stats(snapshot: dict[str, Any]) -> str:
    """The human view of :meth:`MountStats.snapshot` (``pcache stats``)."""
    from objstore.cli import human_bytes

    lines = [
        f"{snapshot['source']} on {snapshot['mountpoint']}, up {snapshot['uptime_s']:.0f}s",
        f"read {human_bytes(snapshot['bytes']['read'])}, "
        f"written {human_bytes(snapshot['bytes']['written'])}; "
        f"read requests: max {human_bytes(snapshot['read_request_bytes']['max'])}, "
        f"mean {human_bytes(snapshot['read_request_bytes']['mean'])}",
    ]
    sources = snapshot["blocks_by_source"]
    if sources:
        by_source = ", ".join(f"{name} {count}" for name, count in sorted(sources.items()))
        lines.append(
            f"blocks by source: {by_source}; hit ratio local "
            f"{snapshot['hit_ratio']['local']:.1%}, cluster {snapshot['hit_ratio']['cluster']:.1%}"
        )
    lines.append("")
    lines.append(
        f"{'op':<12} {'calls':>9} {'errors':>7} {'mean ms':>9} {'p50 ms':>9} {'p90 ms':>9} "
        f"{'p99 ms':>9}"
    )
    for name, op in snapshot["ops"].items():
        errors = sum(op["errors"].values())
        lines.append(
            f"{name:<12} {op['calls']:>9} {errors:>7} {op['mean_ms']:>9.3f} {op['p50_ms']:>9.3f} "
            f"{op['p90_ms']:>9.3f} {op['p99_ms']:>9.3f}"
        )
    return "\n".join(lines)
