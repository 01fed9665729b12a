"""What a client was last told, for when neither a worker nor the store answers (issue 18).

A mount whose node's worker is down asks the store itself; when the store cannot be reached
either, it answers lookups, stats and directory pages from what a worker or the store last
said, up to ``max_age`` seconds old (the serve-stale rule the workers follow). Only answers
that found something are kept: a name never seen stays an error, not a made-up "no such
file". Bounded (least recently used first out), thread-safe, in memory only.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

MAX_ENTRIES = 100_000  # stats and resolves (a few hundred bytes each)
MAX_PAGES = 64  # listing pages (up to 1,000 names each)


class LastKnown:
    def __init__(
        self,
        max_age: float,
        *,
        max_entries: int = MAX_ENTRIES,
        max_pages: int = MAX_PAGES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._maps: dict[bool, OrderedDict[Hashable, tuple[float, Any]]] = {
            False: OrderedDict(),
            True: OrderedDict(),
        }
        self._bounds = {False: max_entries, True: max_pages}
        self.answered = 0  # answers given from here

    def note(self, key: Hashable, value: Any, *, page: bool = False) -> None:
        if self.max_age <= 0:
            return
        with self._lock:
            entries = self._maps[page]
            entries[key] = (self._clock(), value)
            entries.move_to_end(key)
            while len(entries) > self._bounds[page]:
                entries.popitem(last=False)

    def get(self, key: Hashable, *, page: bool = False) -> Any | None:
        """The value last noted under ``key`` when it is at most ``max_age`` old."""
        with self._lock:
            entries = self._maps[page]
            found = entries.get(key)
            if found is None or self._clock() - found[0] > self.max_age:
                return None
            entries.move_to_end(key)
            self.answered += 1
            return found[1]
