"""The metadata cache on disk: stats, listings and pages of long listings with their fetch
times, so that a restarted worker answers for the trees it knew at once (issue 18).

:class:`~pcache.metacache.MetadataCache` keeps its maps in memory and notes which entries
changed; :meth:`MetadataStore.save` writes those (their current value, or their removal) in
one LMDB transaction, and the worker calls it once a second and when it stops.
:meth:`MetadataStore.load` reads everything back at start.

Invariants and crash semantics:
    - Times are kept as wall-clock seconds (monotonic clocks restart with the machine); an
      entry loaded back keeps the TTL it had left, and one past its TTL and its serve-stale
      grace is not loaded (and is deleted).
    - It is a cache, written without fsync: a crash may lose the last second of changes. An
      invalidation lost so is bounded by the entry's TTL, as any cached answer is; changes
      journalled on this node are not here at all (the write-back journal is durable and wins
      over every cached answer).
    - A store that cannot be opened or read (corrupt, another version) is emptied and the
      worker starts cold: it never fails the worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from objstore.base import ListPage

from .protocol import info_from_json, info_to_json

log = logging.getLogger(__name__)

FORMAT = 1
_META_KEY = b"\x00format"


@dataclass(frozen=True)
class Saved:
    """One cache entry as stored: which map (``"stat"``, ``"listing"`` or ``"page"``), its key,
    its value (an ObjectInfo, ``"missing"``, ``("listed", ObjectInfo)`` or a ListPage), and
    wall-clock times (``expires`` None: never, immutable mode)."""

    kind: str
    key: tuple[str, str]
    value: Any
    expires: float | None
    fetched: float


def _db_key(kind: str, key: tuple[str, str]) -> bytes:
    # LMDB keys are at most 511 bytes and object keys up to 1,024: a digest, the key in the value
    return hashlib.blake2b(json.dumps([kind, *key]).encode(), digest_size=20).digest()


def _encode_value(value: Any) -> Any:
    if isinstance(value, ListPage):
        return {
            "page": [info_to_json(o, full=False) for o in value.objects],
            "prefixes": value.prefixes,
            "token": value.token,
        }
    if isinstance(value, tuple):  # ("listed", info)
        return {"listed": info_to_json(value[1], full=False)}
    if value == "missing":
        return "missing"
    return {"info": info_to_json(value, full=False)}


def _decode_value(data: Any) -> Any:
    if data == "missing":
        return "missing"
    if "page" in data:
        return ListPage(
            [info_from_json(o) for o in data["page"]], list(data["prefixes"]), data["token"]
        )
    if "listed" in data:
        return ("listed", info_from_json(data["listed"]))
    return info_from_json(data["info"])


class MetadataStore:
    """An LMDB environment at ``path`` holding :class:`Saved` entries."""

    def __init__(self, path: Path, map_size: int = 8 << 30) -> None:
        self.path = path
        self._map_size = map_size
        try:
            self._env = self._open()
        except lmdb.Error as exc:
            log.warning("metadata cache %s unreadable (%s): starting cold", path, exc)
            shutil.rmtree(path, ignore_errors=True)
            self._env = self._open()

    def _open(self) -> lmdb.Environment:
        self.path.mkdir(parents=True, exist_ok=True)
        env = lmdb.open(
            str(self.path), map_size=self._map_size, subdir=True, sync=False, metasync=False
        )
        with env.begin(write=True) as txn:
            found = txn.get(_META_KEY)
            if found is None:
                txn.put(_META_KEY, str(FORMAT).encode())
            elif found != str(FORMAT).encode():
                raise lmdb.Error(f"format {found!r}, expected {FORMAT}")
        return env

    def load(self) -> Iterator[Saved]:
        """Every entry still worth having (see the module's invariants); the rest is deleted."""
        now = time.time()
        dead: list[bytes] = []
        try:
            with self._env.begin() as txn:
                for db_key, raw in txn.cursor():
                    if db_key == _META_KEY:
                        continue
                    try:
                        data = json.loads(bytes(raw))
                        saved = Saved(
                            data["kind"],
                            (data["key"][0], data["key"][1]),
                            _decode_value(data["value"]),
                            data["expires"],
                            float(data["fetched"]),
                        )
                    except (ValueError, KeyError, TypeError, IndexError):
                        dead.append(bytes(db_key))
                        continue
                    if saved.expires is not None and saved.expires + data.get("grace", 0) < now:
                        dead.append(bytes(db_key))
                        continue
                    yield saved
        except lmdb.Error as exc:
            log.warning("metadata cache %s unreadable (%s): starting cold", self.path, exc)
            return
        if dead:
            with self._env.begin(write=True) as txn:
                for db_key in dead:
                    txn.delete(db_key)

    def save(
        self, changed: Iterable[tuple[str, tuple[str, str], Saved | None]], grace: float
    ) -> int:
        """Write ``(kind, key, entry)`` changes (entry None: removed) in one transaction."""
        count = 0
        with self._env.begin(write=True) as txn:
            for kind, key, saved in changed:
                count += 1
                db_key = _db_key(kind, key)
                if saved is None:
                    txn.delete(db_key)
                    continue
                record = {
                    "kind": kind,
                    "key": list(key),
                    "value": _encode_value(saved.value),
                    "expires": saved.expires,
                    "fetched": saved.fetched,
                    "grace": grace,
                }
                txn.put(db_key, json.dumps(record, separators=(",", ":")).encode())
        return count

    def close(self) -> None:
        self._env.close()
