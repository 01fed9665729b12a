"""Thread priorities: bulk transfer threads yield the CPU to threads that answer requests.

A worker's uploads (the part threads of :mod:`pcache.eager`, the uploaders of
:mod:`pcache.writeback`) move gigabytes with little Python work but much kernel time, and on a
node whose cores are busy (training, or a store on the same host) every metadata request
queued behind them waits for a core: the three requests of an ``os.replace`` after a 1 GiB
write took 35-70 ms on 2 cores while its parts uploaded. Lowering the transfer threads' own
nice value (Linux: a thread id is a ``PRIO_PROCESS`` target) lets the event loop's thread
preempt them; the uploads still get every idle cycle.
"""

from __future__ import annotations

import logging
import os
import threading

BULK_NICE = 10  # added to the process's nice value for bulk transfer threads

log = logging.getLogger(__name__)


def as_bulk_thread() -> None:
    """Lower the calling thread's CPU priority (best effort: never fails the caller)."""
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + BULK_NICE))
    except (OSError, AttributeError) as exc:  # not Linux, or refused: same priority as the rest
        log.debug("could not lower a transfer thread's priority: %s", exc)
