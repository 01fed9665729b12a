"""Multipart uploads of staging files, filled while the file is still being written.

An :class:`EagerUpload` belongs to one staging file (a write session). The writer reports its
*frontier*, the end of the prefix it has written contiguously from offset 0: once the frontier
passes :data:`EAGER_AFTER_PARTS` parts, the upload is created and every whole part below the
frontier is uploaded in the background, a few at a time. At commit (:meth:`EagerUpload.finish`)
only the parts still missing (the tail, and parts written over since) are uploaded before the
upload is completed: remote durability lags the writer by little, and a file larger than the
cache can be written, because uploaded parts can be dropped from the cache disk (*released*).

Invariants:

* A part is *clean* when it was read from the staging file and no write reported since touched
  its range; only clean parts are reused. A writer reports every write below the frontier it last
  reported (:meth:`dirty`) before the commit that contains it, and a part whose range is dirtied
  while its upload is in flight is not made clean; so a completed object never holds bytes older
  than its commit.
* Parts are numbered from 1 and all but the last are ``part_size`` bytes (the store's minimum
  part size or more); a clean part that no longer fits the layout of the committed size (the old
  last part) is uploaded again.
* ``released`` is the prefix of the staging file whose bytes were dropped from the cache disk
  (hole-punched by the writer) because they are in clean parts. Those bytes exist only in the
  store's parts: they are never reused locally, and an upload that holds released bytes is never
  aborted to start over (a store that lost it is a permanent, reported failure).
* Completing the upload consumes it; a later commit of the same session starts a new one.
* A part written over after it was sent is sent again only at commit (not in the background),
  under the same number: S3, OSS and MinIO replace it; a store that keeps the first one (rclone
  serve s3) refuses, and the upload starts over from the staging file
  (:class:`CannotReplacePart`), or fails for good when released bytes went with it.

The object's metadata is fixed when an upload is created; when the committed metadata differs
(the mtime always moves on while the file is written), the completed object's metadata is
replaced once in the store (a server-side copy onto itself).

Threads: part uploads run on a shared :class:`PartPool` of daemon threads; :meth:`finish` runs
on the caller's (an uploader's). Lock order: the staged file's lock, then this object's; the
store is never called with the lock held.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping

from objstore.base import ObjectInfo, PartInfo, Store
from objstore.errors import UploadNotFound, is_permanent

log = logging.getLogger(__name__)

__all__ = [
    "EAGER_AFTER_PARTS",
    "CannotReplacePart",
    "EagerUpload",
    "PartPool",
    "Superseded",
    "map_daemon",
]

EAGER_AFTER_PARTS = 2  # the upload starts once this many whole parts are written
PARTS_IN_FLIGHT = 2  # per file while it is written, so one writer leaves uploaders to others


class Superseded(Exception):
    """The record being uploaded was replaced meanwhile (a newer commit, a rename, an unlink)."""


class CannotReplacePart(UploadNotFound):
    """The store refused a part sent again with new bytes: the upload must start over."""


class PartPool:
    """Daemon threads running queued part uploads (never joined: a stopping worker does not
    wait on the store)."""

    def __init__(self, threads: int) -> None:
        self._queue: deque[Callable[[], None]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        for i in range(threads):
            threading.Thread(target=self._run, name=f"pcache-eager-{i}", daemon=True).start()

    def submit(self, task: Callable[[], None]) -> None:
        with self._cond:
            if not self._closed:
                self._queue.append(task)
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                task = self._queue.popleft()
            try:
                task()
            except Exception:  # the thread must survive anything
                log.exception("background part upload failed")


class EagerUpload:
    """The multipart upload of one staging file (see the module docstring).

    Args:
        store, key: where the object goes (``key`` is fixed for the upload's life).
        path: the staging file parts are read from.
        part_size: bytes per part (all but the last).
        pool: runs part uploads while the file is written; None: only :meth:`finish` uploads.
        upload_id, parts, released: the state of an upload journalled before a restart.
        on_created: called with the upload id once the store has created it (to journal it).
    """

    def __init__(
        self,
        store: Store,
        key: str,
        path: str,
        part_size: int,
        pool: PartPool | None,
        *,
        upload_id: str = "",
        parts: Iterable[PartInfo] = (),
        released: int = 0,
        on_created: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.key = key
        self.path = path
        self.part_size = max(part_size, store.features.min_part_size)
        self.upload_id = upload_id
        self.released = released
        self._clean: dict[int, PartInfo] = {p.part_number: p for p in parts}
        self._generation: dict[int, int] = {}
        self._flight: set[int] = set()
        self._sent: set[int] = {p.part_number for p in parts}  # numbers the store has seen
        self._frontier = 0
        self._creating = False
        self._closed = False  # completed or aborted: nothing more goes to this upload
        self._finishing = False  # finish() is uploading: no background parts meanwhile
        self.completed = False
        self.error: BaseException | None = None
        self._pool = pool
        self._on_created = on_created or (lambda upload_id: None)
        self._cond = threading.Condition()

    def __repr__(self) -> str:
        return f"EagerUpload({self.key!r}, {len(self._clean)} clean part(s))"

    # -- the writer's reports ------------------------------------------------------------------

    def _range(self, number: int) -> tuple[int, int]:
        return (number - 1) * self.part_size, number * self.part_size

    def advance(self, frontier: int) -> None:
        """The writer has written ``[0, frontier)``: upload the whole parts below it."""
        with self._cond:
            self._frontier = frontier
            if self._pool is None or self._closed or self._finishing or self.error is not None:
                return
            if not self.upload_id:
                if frontier >= EAGER_AFTER_PARTS * self.part_size and not self._creating:
                    self._creating = True
                    self._pool.submit(self._create)
                return
            self._schedule_locked()

    def dirty(self, start: int, end: int) -> None:
        """Bytes in ``[start, end)`` changed: parts overlapping it are not clean any more."""
        if end <= start:
            return
        with self._cond:
            first = start // self.part_size + 1
            last = (end - 1) // self.part_size + 1
            for number in list(self._clean) + list(self._flight):
                if first <= number <= last:
                    self._clean.pop(number, None)
                    self._generation[number] = self._generation.get(number, 0) + 1

    def truncated(self, size: int) -> None:
        """The file was cut to ``size``: the part holding ``size`` and those after changed."""
        self.dirty(size, 1 << 62)
        with self._cond:
            self._frontier = min(self._frontier, size)

    def uploaded_prefix(self) -> int:
        """Bytes from offset 0 that clean parts hold (what the writer may release)."""
        with self._cond:
            return self._prefix_locked()

    def wait_uploaded(self, beyond: int, timeout: float) -> int:
        """Wait up to ``timeout`` for the uploaded prefix to pass ``beyond`` (a writer that
        needs room); returns the prefix."""
        with self._cond:
            self._cond.wait_for(
                lambda: (
                    self._prefix_locked() > beyond
                    or self.error is not None
                    or self._closed
                    or not (self._flight or self._creating)
                ),
                timeout,
            )
            return self._prefix_locked()

    def _prefix_locked(self) -> int:
        number = 1
        while number in self._clean:
            number += 1
        return (number - 1) * self.part_size

    def state(self) -> tuple[str, list[PartInfo]]:
        """The upload id and the clean parts, for the journal."""
        with self._cond:
            return self.upload_id, [self._clean[n] for n in sorted(self._clean)]

    @property
    def started(self) -> bool:
        with self._cond:
            return bool(self.upload_id) or self._creating

    @property
    def is_open(self) -> bool:
        """Neither completed nor aborted: parts may still go to it."""
        with self._cond:
            return not self._closed

    # -- background ----------------------------------------------------------------------------

    def _create(self) -> None:
        try:
            upload_id = self.store.create_upload(self.key)
        except Exception as exc:  # eager uploading is an optimisation: finish starts over
            log.info("eager upload of %r not started: %s", self.key, exc)
            with self._cond:
                self._creating = False
                self.error = exc
                self._cond.notify_all()
            return
        self._on_created(upload_id)  # journalled first: a crash from here on aborts it
        with self._cond:
            self._creating = False
            abandoned = self._closed
            if not abandoned:
                self.upload_id = upload_id
                self._schedule_locked()  # in the same hold: a waiter never sees it idle
            self._cond.notify_all()
        if abandoned:
            _abort_quietly(self.store, self.key, upload_id)

    def _schedule_locked(self) -> None:
        if self._pool is None or self._closed or self._finishing or self.error is not None:
            return
        last_whole = min(self._frontier // self.part_size, self.store.features.max_parts)
        for number in range(1, last_whole + 1):
            if len(self._flight) >= PARTS_IN_FLIGHT:
                return
            if number in self._clean or number in self._flight or number in self._sent:
                continue  # a part sent and written over since goes again at commit
            self._flight.add(number)
            generation = self._generation.get(number, 0)
            self._pool.submit(functools.partial(self._background_part, number, generation))

    def _background_part(self, number: int, generation: int) -> None:
        start, end = self._range(number)
        try:
            part = self._upload_part(number, end - start)
        except Exception as exc:
            log.info(
                "eager part %d of %r failed (it is uploaded at commit): %s", number, self.key, exc
            )
            with self._cond:
                self._flight.discard(number)
                self.error = exc  # no more background parts: finish uploads what is missing
                self._cond.notify_all()
            return
        with self._cond:
            self._flight.discard(number)
            if self._generation.get(number, 0) == generation and not self._closed:
                self._clean[number] = part
            self._cond.notify_all()
            self._schedule_locked()

    def _upload_part(
        self, number: int, length: int, read: Callable[[int, int], bytes] | None = None
    ) -> PartInfo:
        start = (number - 1) * self.part_size
        if start < self.released:
            raise UploadNotFound(f"part {number} of {self.key!r} was released from the cache")
        if read is not None:
            data = read(start, length)
        else:
            with open(self.path, "rb") as file:
                data = os.pread(file.fileno(), length, start)
        if len(data) != length:
            raise OSError(f"staging file of {self.key!r} is shorter than part {number}")
        with self._cond:
            again = number in self._sent
            self._sent.add(number)
        try:
            return self.store.upload_part(self.key, self.upload_id, number, data)
        except Exception as exc:
            if again and is_permanent(exc) and not isinstance(exc, UploadNotFound):
                raise CannotReplacePart(
                    f"the store refused part {number} of {self.key!r} sent again: {exc}"
                ) from exc
            raise

    # -- commit --------------------------------------------------------------------------------

    def finish(
        self,
        size: int,
        metadata: Mapping[str, str],
        current: Callable[[], bool],
        *,
        threads: int,
        read: Callable[[int, int], bytes] | None = None,
        copy: Callable[[str, int, int, int], PartInfo | None] | None = None,
    ) -> ObjectInfo:
        """Upload what is missing of the first ``size`` bytes and complete the upload.

        Args:
            current: whether the record being uploaded is still the newest (checked before each
                part and before completing; :class:`Superseded` when not: the upload is kept).
            threads: parts uploaded in parallel.
            read: reads the object's bytes (default: the staging file).
            copy: makes a part inside the store, ``(upload_id, number, start, length)``, or
                returns None when it cannot (then it is read and uploaded).

        Raises:
            UploadNotFound: the store lost the upload and released bytes went with it.
        """
        with self._cond:
            self._cond.wait_for(lambda: not self._flight and not self._creating)
            if self._closed:
                raise UploadNotFound(f"the upload of {self.key!r} was completed or aborted")
            self.error = None
            self._finishing = True
        try:
            return self._finish(size, metadata, current, threads, read, copy)
        finally:
            with self._cond:
                self._finishing = False

    def _finish(
        self,
        size: int,
        metadata: Mapping[str, str],
        current: Callable[[], bool],
        threads: int,
        read: Callable[[int, int], bytes] | None,
        copy: Callable[[str, int, int, int], PartInfo | None] | None,
    ) -> ObjectInfo:
        count = max(1, -(-size // self.part_size))
        if count > self.store.features.max_parts:
            raise UploadNotFound(f"{self.key!r}: {size} bytes need more than the store's parts")
        if not self.upload_id:
            self.upload_id = self.store.create_upload(self.key, metadata=dict(metadata) or None)
            self._on_created(self.upload_id)
            created_with = dict(metadata)
        else:
            created_with = {}
        last_size = size - (count - 1) * self.part_size

        def part(number: int) -> PartInfo:
            length = self.part_size if number < count else last_size
            with self._cond:
                clean = self._clean.get(number)
                generation = self._generation.get(number, 0)
            if clean is not None and clean.size == length:
                return clean
            if not current():
                raise Superseded
            start = (number - 1) * self.part_size
            uploaded = None
            if copy is not None:
                with self._cond:  # a copy the server half did (no ETag) may have used the number
                    self._sent.add(number)
                uploaded = copy(self.upload_id, number, start, length)
            if uploaded is None:
                uploaded = self._upload_part(number, length, read)
            with self._cond:  # reusable later only below the frontier (writes there are reported)
                if (
                    self._generation.get(number, 0) == generation
                    and length == self.part_size
                    and number * self.part_size <= self._frontier
                ):
                    self._clean[number] = uploaded
            return uploaded

        parts = map_daemon(part, range(1, count + 1), threads)
        if not current():
            raise Superseded
        info = self.store.complete_upload(self.key, self.upload_id, parts)
        with self._cond:
            self._closed = self.completed = True
        if dict(metadata) != created_with and self.store.features.replace_metadata:
            info = self.store.replace_metadata(self.key, dict(metadata))
            log.debug("%r: metadata set after its eager upload", self.key)
        return info if info.metadata == dict(metadata) else _with_metadata(info, metadata)

    def abort(self) -> None:
        """Discard the upload (nothing needs it: the file was removed or replaced); the store
        is told in the background."""
        with self._cond:
            self._closed = True
            upload_id = "" if self.completed else self.upload_id
            self._cond.notify_all()
        if upload_id:
            threading.Thread(
                target=_abort_quietly, args=(self.store, self.key, upload_id), daemon=True
            ).start()


def _with_metadata(info: ObjectInfo, metadata: Mapping[str, str]) -> ObjectInfo:
    return ObjectInfo(info.key, info.size, info.mtime, etag=info.etag, metadata=dict(metadata))


def _abort_quietly(store: Store, key: str, upload_id: str) -> None:
    try:
        store.abort_upload(key, upload_id)
    except OSError as exc:  # the store forgets incomplete uploads by its lifecycle rules
        log.info("could not abort upload %s of %r: %s", upload_id, key, exc)


def map_daemon(func: Callable[[int], PartInfo], items: range, threads: int) -> list[PartInfo]:
    """``[func(i) for i in items]`` on up to ``threads`` daemon threads (never joined at
    interpreter exit, so a stopping worker does not wait on the store); first error raised."""
    results: dict[int, PartInfo] = {}
    errors: list[BaseException] = []
    todo = deque(items)
    lock = threading.Lock()
    done = threading.Event()
    running = [0]

    def work() -> None:
        while True:
            with lock:
                if errors or not todo:
                    running[0] -= 1
                    if running[0] == 0:
                        done.set()
                    return
                item = todo.popleft()
            try:
                result = func(item)
            except BaseException as exc:
                with lock:
                    errors.append(exc)
                continue
            with lock:
                results[item] = result

    count = max(1, min(threads, len(items)))
    running[0] = count
    for _ in range(count):
        threading.Thread(target=work, name="pcache-part", daemon=True).start()
    done.wait()
    if errors:
        raise errors[0]
    return [results[i] for i in items]
