"""Stat-ahead: the mount's guess that a directory just listed is about to be ``stat``-ed.

A listing gives each object's size, time and version, not its user metadata (mode, owner,
times in the s3fs conventions), so an entry the worker knew only from a listing reaches the
kernel without attributes, and each name's ``lookup`` costs a HEAD of its own, one after
another: ``find``, ``ls -l``, ``rsync`` and a dataloader's ``os.walk`` pay one store round
trip per file. As Lustre's statahead does, the first such lookup of a listed name asks for
that name and the next :data:`BATCH` names of the listing in one request; the worker HEADs
them side by side, and the lookups that follow are answered from here. A sub-directory of
the listing is named ``sub/``: its marker object, whose attributes the directory's
``getattr`` needs (a walk asks for every directory's, one after another, as for files).

Invariants:

- An answer is used once (the lookup it was fetched for: the kernel keeps it from there),
  and only within ``valid_s`` of its arrival: the same freshness the kernel is allowed for
  an entry (the mount's kernel timeout), so stat-ahead changes the cost of a lookup, never
  what it may answer. A local change to a name (:meth:`forget`) drops its answer.
- A name is asked ahead at most once per listing of it; the names remembered are bounded
  (:data:`MAX_NAMES`, oldest directory first), and so are the answers.
- Nothing here blocks or fails: with no answer for a name, its lookup asks alone, as without
  stat-ahead.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Generic, TypeVar

BATCH = 256  # names asked in one stat-ahead request
MAX_NAMES = 200_000  # listed names remembered, all directories together
MAX_ANSWERS = 4 * BATCH

I = TypeVar("I")  # noqa: E741  (an answer: the object's stat, None when it is not there)


class _Listed:
    __slots__ = ("dropped", "names", "position")

    def __init__(self) -> None:
        self.names: list[str] = []  # in listing order, from the ``dropped``-th on
        self.dropped = 0  # names cut from the front (past the bound)
        self.position: dict[str, int] = {}  # names not asked ahead yet -> their number

    def number(self) -> int:
        """The number the next listed name gets (positions never shift)."""
        return self.dropped + len(self.names)


class StatAhead(Generic[I]):
    """What readdir showed without attributes, and the answers fetched ahead for it."""

    def __init__(self, valid_s: float, *, batch: int = BATCH, max_names: int = MAX_NAMES) -> None:
        self.valid_s = valid_s
        self.batch = batch
        self.max_names = max_names
        self._dirs: OrderedDict[str, _Listed] = OrderedDict()
        self._names = 0
        self._answers: OrderedDict[str, tuple[float, I | None]] = OrderedDict()
        self.batches = 0  # requests sent
        self.asked = 0  # names they asked for
        self.used = 0  # lookups answered from them

    def listed(self, directory: str, names: list[str]) -> None:
        """``names`` of ``directory`` (in listing order) reached the kernel without their
        attributes."""
        if not names:
            return
        listed = self._dirs.pop(directory, None) or _Listed()
        self._dirs[directory] = listed
        for name in names:
            if name not in listed.position:
                listed.position[name] = listed.number()
                listed.names.append(name)
                self._names += 1
        while self._names > self.max_names and len(self._dirs) > 1:
            _, oldest = self._dirs.popitem(last=False)
            self._names -= len(oldest.names)
        if self._names > self.max_names:  # one directory alone past the bound: its start goes
            listed = next(iter(self._dirs.values()))
            cut = self._names - self.max_names
            for name in listed.names[:cut]:
                listed.position.pop(name, None)
            del listed.names[:cut]
            listed.dropped += cut
            self._names -= cut

    def batch_for(self, path: str) -> list[str]:
        """The paths to ask ahead now that ``path`` is looked up: ``path`` and the names after
        it in its directory's listing not asked yet; empty when ``path`` is not a listed name
        waiting for its attributes."""
        directory, _, name = path.rstrip("/").rpartition("/")
        if path.endswith("/"):
            name += "/"  # a sub-directory's marker
        listed = self._dirs.get(directory)
        if listed is None:
            return []
        start = listed.position.get(name)
        if start is None:
            return []
        prefix = directory + "/" if directory else ""
        batch = []
        names = listed.names
        for at in range(start - listed.dropped, len(names)):
            candidate = names[at]
            if listed.position.pop(candidate, None) is not None:
                batch.append(prefix + candidate)
                if len(batch) == self.batch:
                    break
        if not listed.position:  # every name asked: the directory is done
            self._names -= len(listed.names)
            del self._dirs[directory]
        if len(batch) > 1:
            self.batches += 1
            self.asked += len(batch)
        return batch

    def answered(self, answers: dict[str, I | None]) -> None:
        now = time.monotonic()
        for path, info in answers.items():
            self._answers.pop(path, None)
            self._answers[path] = (now, info)
        while len(self._answers) > MAX_ANSWERS:
            self._answers.popitem(last=False)

    def take(self, path: str) -> tuple[bool, I | None]:
        """``(True, answer)`` once for a path answered ahead moments ago, else ``(False,
        None)``."""
        got = self._answers.pop(path, None)
        if got is None or time.monotonic() - got[0] > self.valid_s:
            return False, None
        self.used += 1
        return True, got[1]

    def forget(self, path: str) -> None:
        """``path`` changed here: an answer fetched for it (or, a directory, for its marker
        ``path/``) is no longer the truth."""
        self._answers.pop(path, None)
        self._answers.pop(path + "/", None)

    def counts(self) -> dict[str, int]:
        """For the mount's statistics: batches sent, names asked, lookups answered."""
        return {"batches": self.batches, "asked": self.asked, "answered": self.used}

    def clear(self) -> None:
        self._answers.clear()
        self._dirs.clear()
        self._names = 0
