"""Write-back commits while uploads fall behind: does a commit cost more as the backlog grows?

A ``WriteBack`` over a local directory with ``upload_delay`` longer than the run, so nothing
uploads and every commit joins the backlog (what an untar into a store that is slow or down
does); its upload threads run as in a worker. Prints commits/s per slice of the backlog: a
flat line means a commit costs the same with 1,000 or 100,000 pending. Before the upload queue
was kept by due time (issue 18), each commit woke every upload thread to scan the whole
backlog: 468 commits/s at 5,000 pending, 46 at 20,000.

    .venv/bin/python bench/writeback_backlog.py [--commits 20000] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from objstore import open_store  # noqa: E402
from pcache.blockstore import BlockStore, CacheDir  # noqa: E402
from pcache.writeback import WriteBack  # noqa: E402

MiB = 1 << 20


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--commits", type=int, default=20_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rates: list[tuple[int, float]] = []
    with tempfile.TemporaryDirectory(prefix="wb-backlog-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        (root / "store").mkdir()
        blocks = BlockStore([CacheDir(root / "disk", 256 * MiB)], root / "index", block_size=MiB)
        wb = WriteBack(
            blocks, {"data": open_store(str(root / "store"))}, root / "state", upload_delay=3600
        )
        wb.start()
        try:
            step = max(1, args.commits // 4)
            started = last = time.monotonic()
            for i in range(args.commits):
                wb.commit_inline("data", f"backlog/f{i:06d}", b"x")
                if (i + 1) % step == 0:
                    now = time.monotonic()
                    rates.append((i + 1, step / (now - last)))
                    last = now
            total = args.commits / (time.monotonic() - started)
        finally:
            wb.close()
            blocks.close()
    if args.json:
        print(json.dumps({"slices": rates, "commits_per_s": total}))
        return 0
    print(f"{'pending after':>14} | commits/s in the last slice")
    for pending, rate in rates:
        print(f"{pending:>14,} | {rate:,.0f}")
    flat = rates[-1][1] / rates[0][1]
    print(f"last slice / first slice: {flat:.2f} (1.0: a commit costs the same at any backlog)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
