"""Live progress of a job: thread-safe counters, and a reporter that shows them.

On a terminal the reporter draws a rich display (listing rate, objects and bytes done, rate,
ETA); otherwise it prints a plain line every few seconds, which is what logs and CI want.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from objstore.cli import human_bytes


@dataclass
class Counters:
    """Everything a job counts. Update through :meth:`add` (thread-safe)."""

    phase: str = "starting"
    src_listed: int = 0
    src_listed_bytes: int = 0
    dst_listed: int = 0
    to_copy: int = 0
    to_copy_bytes: int = 0
    copied: int = 0
    copied_bytes: int = 0
    bytes_moved: int = 0
    skipped: int = 0
    checked: int = 0
    deleted: int = 0
    failed: int = 0
    verified: int = 0
    mismatches: int = 0
    resumed_parts: int = 0
    server_side: int = 0
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")
            }


def describe(snap: dict[str, Any]) -> str:
    """One plain progress line."""
    elapsed = max(1e-6, time.monotonic() - float(snap["started"]))
    rate = float(snap["bytes_moved"]) / elapsed
    left = float(snap["to_copy_bytes"]) - float(snap["bytes_moved"])
    eta = f"{left / rate:,.0f}s" if rate > 0 and left > 0 else "-"
    return (
        f"{snap['phase']}: listed {snap['src_listed']:,} src / {snap['dst_listed']:,} dst; "
        f"copied {snap['copied']:,}/{snap['to_copy']:,} objects, "
        f"{human_bytes(float(snap['bytes_moved']))}/{human_bytes(float(snap['to_copy_bytes']))} "
        f"at {human_bytes(rate)}/s, ETA {eta}; skipped {snap['skipped']:,}, deleted {snap['deleted']:,}, "
        f"failed {snap['failed']:,}, verified {snap['verified']:,}, mismatches {snap['mismatches']:,}"
    )


PROGRESS_PREFIX = "PROGRESS "


def progress_line(snap: dict[str, Any]) -> str:
    """``PROGRESS {json}``: the counters with the elapsed seconds instead of a clock reading."""
    from objstore.retry import retry_count

    out = {k: v for k, v in snap.items() if k != "started"}
    out["elapsed"] = round(time.monotonic() - float(snap["started"]), 3)
    out["request_retries"] = retry_count()  # this process's requests retried (transient errors)
    return PROGRESS_PREFIX + json.dumps(out, separators=(",", ":"))


class Reporter:
    """Shows :class:`Counters` until stopped: rich on a TTY, plain lines otherwise, or nothing."""

    def __init__(
        self,
        counters: Counters,
        *,
        stream: TextIO | None = None,
        interval: float = 5.0,
        enabled: bool = True,
        json_lines: bool = False,
    ) -> None:
        self.counters = counters
        self.stream = stream or sys.stderr
        self.interval = interval
        self.enabled = enabled or json_lines
        self.json_lines = json_lines
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Reporter:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        if self.json_lines:  # for programs (babel-sync serve): one snapshot per line
            while not self._stop.wait(self.interval):
                print(progress_line(self.counters.snapshot()), file=self.stream, flush=True)
            print(progress_line(self.counters.snapshot()), file=self.stream, flush=True)
            return
        if self.stream.isatty():
            console = Console(file=self.stream)
            with Live(self._table(), console=console, refresh_per_second=4, transient=True) as live:
                while not self._stop.wait(0.25):
                    live.update(self._table())
            return
        while not self._stop.wait(self.interval):
            print(describe(self.counters.snapshot()), file=self.stream, flush=True)

    def _table(self) -> Table:
        snap = self.counters.snapshot()
        elapsed = max(1e-6, time.monotonic() - float(snap["started"]))
        table = Table(show_header=False, box=None)
        table.add_row("phase", str(snap["phase"]))
        table.add_row(
            "listed",
            f"{snap['src_listed']:,} source, {snap['dst_listed']:,} destination "
            f"({float(snap['src_listed']) / elapsed:,.0f} keys/s)",
        )
        table.add_row("progress", describe(snap).split("; ", 1)[1])
        return table
