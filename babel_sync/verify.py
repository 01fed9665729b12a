"""Post-transfer verification of one copied object: a sampled structural check and a full CRC check.

Responsibility: after babel-sync copied ``src_key`` to ``dst_key`` (possibly across regions), say
whether the destination holds the source's bytes, and if not, where they differ.

* :func:`verify_sampled` compares sizes (a mismatch fails without reading a byte), compares the
  services' whole-object CRCs where both sides report the same algorithm, then reads blocks from
  both sides with ranged GETs and compares their CRC-64/NVME: the first and the last block, one
  read straddling every part boundary (a probe on each side), and ``samples`` blocks drawn by
  ``random.Random(seed)`` from the rest. A differing block is bisected to the differing bytes.
* :func:`verify_full` re-reads the whole destination in blocks (bounded memory) and compares its
  streaming CRC with the CRC the transfer computed, or, lacking one, with the source re-read.

Honest limits of the sampled mode: it is a *structural* check. It catches truncation, missing,
duplicated or misordered parts (their damage always touches a part-boundary block), zeroed or
garbage ranges, and stale versions, i.e. damage covering a fraction ``f`` of the blocks, which
``s`` random blocks miss with probability at most ``(1-f)^s`` (sampling without replacement does
a little better, so ``1-(1-f)^s`` is a lower bound of the detection probability). It does **not**
catch an isolated flipped bit or byte: that covers one block in thousands and is almost always
missed. That is the job of the runtime CRC (computed while streaming each part and checked against
both servers' CRCs) and of :func:`verify_full`. A boundary probe misses a misplaced part only if
the wrong and the right part hold the same bytes around the boundary (long runs of zeros, say).
A CRC-64 comparison misses a difference with probability about 2^-64.

Thread-safety: every function may run in many threads at once; each call owns its thread pool and
no state is shared between calls. Stores must be thread-safe, as :class:`objstore.Store` is.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from objstore import ChecksumValue, ObjectInfo, Store, checksum

log = logging.getLogger(__name__)

#: Block comparisons use CRC-64/NVME: awscrt computes it at several GB/s and drops the GIL.
BLOCK_ALGORITHM = "crc64nvme"
#: Bisection stops at pieces this small and compares their bytes directly.
LEAF_SIZE = 4096
#: Most differing sample blocks narrowed by bisection; more are reported at block granularity
#: (a stale version differs everywhere, and the caller re-copies it anyway).
MAX_ESCALATIONS = 8
#: Most per-block differences :func:`verify_full` lists besides the whole-object CRC.
MAX_REPORTED_BLOCKS = 16
#: Bytes read on each side of a part boundary by default (capped at the block size): enough to
#: tell a missing or misplaced part, whose bytes differ almost everywhere, from the right one.
BOUNDARY_BYTES = 64 << 10
_SCAN = 256  # bytes compared per slice when looking for the first/last differing byte


@dataclass(frozen=True)
class Mismatch:
    """One difference: ``length`` bytes at ``offset`` of the destination, and why."""

    offset: int
    length: int
    reason: str


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of one verification.

    Attributes:
        ok: the destination matched by every check this mode ran.
        mode: ``"sampled"`` or ``"full"``.
        key: the destination key.
        size_src, size_dst: sizes from ``stat``.
        blocks_checked: blocks compared (sampled) or destination blocks read (full).
        bytes_read: bytes fetched from both stores together, escalation reads included.
        seed: the sampling seed (sampled mode), to reproduce the run; ``None`` in full mode.
        mismatches: what differs; empty when ``ok``.
        detection_1pct, detection_10pct: probability that the random samples catch damage
            covering 1% / 10% of the blocks (sampled mode, when blocks were read).
        src_crc, dst_crc: whole-object CRCs compared (full mode), in ``crc_algorithm``.
        crc_algorithm: algorithm of ``src_crc``/``dst_crc``.
    """

    ok: bool
    mode: str
    key: str
    size_src: int
    size_dst: int
    blocks_checked: int = 0
    bytes_read: int = 0
    seed: int | None = None
    mismatches: tuple[Mismatch, ...] = ()
    detection_1pct: float | None = None
    detection_10pct: float | None = None
    src_crc: int | None = None
    dst_crc: int | None = None
    crc_algorithm: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; CRCs as zero-padded hex strings (JavaScript loses 64-bit ints)."""
        out = asdict(self)
        out["mismatches"] = [asdict(m) for m in self.mismatches]
        digits = 2 * checksum.get_algorithm(self.crc_algorithm or BLOCK_ALGORITHM).nbytes
        for name in ("src_crc", "dst_crc"):
            if out[name] is not None:
                out[name] = f"{out[name]:0{digits}x}"
        return out


def detection_probability(fraction: float, samples: int) -> float:
    """Probability that ``samples`` uniformly random blocks hit damage covering ``fraction``
    of the blocks: ``1-(1-f)^s``, exact with replacement and a lower bound without."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within [0, 1], got {fraction}")
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    return 1.0 - (1.0 - fraction) ** samples


def sample_blocks(
    size: int,
    block_size: int,
    part_boundaries: Sequence[int],
    samples: int,
    seed: int,
    *,
    boundary_bytes: int | None = None,
) -> list[tuple[int, int]]:
    """The ``(offset, length)`` blocks :func:`verify_sampled` reads: sorted, non-overlapping,
    within ``[0, size)``. The same arguments always give the same blocks.

    The first and last ``block_size`` block; one read straddling each part boundary, with
    ``boundary_bytes`` (default ``min(block_size, BOUNDARY_BYTES)``) on each side; and
    ``samples`` aligned blocks drawn by ``random.Random(seed)`` among those not read already.
    """
    return _plan(size, block_size, part_boundaries, samples, seed, boundary_bytes)[0]


def _plan(
    size: int,
    block_size: int,
    part_boundaries: Iterable[int],
    samples: int,
    seed: int,
    boundary_bytes: int | None,
) -> tuple[list[tuple[int, int]], int]:
    """The blocks to read and how many of them were drawn at random."""
    side = min(block_size, BOUNDARY_BYTES) if boundary_bytes is None else boundary_bytes
    if size < 0 or block_size <= 0 or samples < 0 or side <= 0:
        raise ValueError(f"bad sampling arguments: {size=}, {block_size=}, {samples=}, {side=}")
    if size == 0:
        return [], 0
    last = (size - 1) // block_size * block_size
    fixed = [(0, min(block_size, size)), (last, size - last)]
    for b in sorted(set(part_boundaries)):
        if 0 < b < size:  # 0 and size are the object's own ends, covered above
            # One GET per boundary: requests, not bytes, are what cost across regions.
            start = max(0, b - side)
            fixed.append((start, min(size, b + side) - start))
    # Random blocks come from the aligned grid minus the grid blocks read in full already, so
    # each draw reads fresh bytes and the stated probability holds over (almost) all blocks.
    taken = sorted(
        {i for off, n in fixed for i in range(-(-off // block_size), (off + n) // block_size)}
        | {last // block_size}  # the short last block
    )
    free = (size + block_size - 1) // block_size - len(taken)
    k = min(samples, free)
    drawn = []
    # random.sample over a range is O(k) even for a billion blocks; map the r-th free index
    # to its grid index by skipping the taken ones below it.
    for r in sorted(random.Random(seed).sample(range(free), k)):
        index = r
        for t in taken:
            if t > index:
                break
            index += 1
        drawn.append((index * block_size, min(block_size, size - index * block_size)))
    blocks: list[tuple[int, int]] = []
    end = 0
    for off, n in sorted(fixed + drawn):
        start = max(
            off, end
        )  # trim overlaps (boundary reads, grid blocks) so no byte is read twice
        if off + n > start:
            blocks.append((start, off + n - start))
            end = off + n
    return blocks, k


@dataclass(frozen=True)
class _Side:
    """One object to read, pinned to the version ``stat`` saw where the store enforces it."""

    store: Store
    key: str
    etag: str | None

    @classmethod
    def of(cls, store: Store, key: str, info: ObjectInfo) -> _Side:
        pin = info.etag if store.features.conditional_get and info.etag else None
        return cls(store, key, pin)

    def read(self, offset: int, length: int) -> bytes:
        return self.store.get_range(self.key, offset, length, if_match=self.etag)

    def crc(self, offset: int, length: int, algorithm: str = BLOCK_ALGORITHM) -> tuple[int, int]:
        """``(crc, bytes read)``; hashing in the worker keeps only a tuple per finished read."""
        data = self.read(offset, length)
        return checksum.compute(algorithm, data), len(data)


def _stat_both(
    pool: ThreadPoolExecutor, src: Store, src_key: str, dst: Store, dst_key: str
) -> tuple[ObjectInfo, ObjectInfo]:
    # Two regions, two round trips: overlap them.
    fs, fd = pool.submit(src.stat, src_key), pool.submit(dst.stat, dst_key)
    return fs.result(), fd.result()


def _size_mismatch(src_info: ObjectInfo, dst_info: ObjectInfo) -> Mismatch:
    short = min(src_info.size, dst_info.size)
    return Mismatch(
        short,
        abs(src_info.size - dst_info.size),
        f"size differs: source {src_info.size}, destination {dst_info.size}",
    )


def _first_diff(a: bytes, b: bytes) -> int | None:
    n = min(len(a), len(b))
    for start in range(0, n, _SCAN):
        if a[start : start + _SCAN] != b[start : start + _SCAN]:
            return next(i for i in range(start, min(n, start + _SCAN)) if a[i] != b[i])
    return n if len(a) != len(b) else None


def _last_diff(a: bytes, b: bytes) -> int | None:
    if len(a) != len(b):
        return max(len(a), len(b)) - 1  # the longer side's tail has nothing to match
    end = len(a)
    while end > 0:
        start = max(0, end - _SCAN)
        if a[start:end] != b[start:end]:
            return next(i for i in range(end - 1, start - 1, -1) if a[i] != b[i])
        end = start
    return None


def _narrow(
    pool: ThreadPoolExecutor,
    src: _Side,
    dst: _Side,
    blocks: Sequence[tuple[int, int, int, int]],
) -> tuple[list[Mismatch], int]:
    """Bisect differing ``(offset, length, src_crc, dst_crc)`` blocks to their first and last
    differing bytes; returns the mismatches and the bytes read.

    Two searches per block, one for the first and one for the last difference, each holding its
    current piece and that piece's CRC on both sides. A level reads the piece's left half from
    both sides and derives the right half's CRCs from the piece's (CRCs are linear), so a level
    costs two requests of half the piece, shared by both searches while their pieces coincide:
    one damaged region costs about one re-read of the block per side, in log2(block/LEAF_SIZE)
    round trips of shrinking reads, all blocks advancing together. Leaves are compared bytewise.
    """
    # (block index, searching for the last difference) -> (offset, length, src crc, dst crc)
    probes = {(i, right): b for i, b in enumerate(blocks) for right in (False, True)}
    read = 0
    while active := {(p[0], p[1]) for p in probes.values() if p[1] > LEAF_SIZE}:
        futures = {
            (lo, n): (pool.submit(src.crc, lo, n // 2), pool.submit(dst.crc, lo, n // 2))
            for lo, n in active
        }
        halves = {piece: (fs.result(), fd.result()) for piece, (fs, fd) in futures.items()}
        read += sum(a[1] + b[1] for a, b in halves.values())
        for k, (lo, n, crc_s, crc_d) in probes.items():
            if n <= LEAF_SIZE:
                continue
            (left_s, _), (left_d, _) = halves[lo, n]
            half = n // 2
            right_s = _right_crc(crc_s, left_s, n - half)
            right_d = _right_crc(crc_d, left_d, n - half)
            go_right = right_s != right_d if k[1] else left_s == left_d
            if go_right:  # the searched-for half, or the other one when that half is equal
                probes[k] = (lo + half, n - half, right_s, right_d)
            else:
                probes[k] = (lo, half, left_s, left_d)
    leaves = {(p[0], p[1]) for p in probes.values()}  # both searches often end in the same leaf
    reads = {p: (pool.submit(src.read, *p), pool.submit(dst.read, *p)) for p in leaves}
    data = {p: (fs.result(), fd.result()) for p, (fs, fd) in reads.items()}
    read += sum(len(a) + len(b) for a, b in data.values())
    out = []
    for i, (off, n, _, _) in enumerate(blocks):
        lo_f, n_f, _, _ = probes[i, False]
        lo_l, n_l, _, _ = probes[i, True]
        first, last = _first_diff(*data[lo_f, n_f]), _last_diff(*data[lo_l, n_l])
        if first is None or last is None or lo_l + last < lo_f + first:
            # The block CRCs differed, the re-reads did not: the object changed under us, or a
            # read was flaky. Report the whole block rather than guess.
            out.append(Mismatch(off, n, "block CRC differed but did not reproduce on re-read"))
        else:
            start, stop = lo_f + first, lo_l + last + 1
            out.append(Mismatch(start, stop - start, f"content differs (in block {off}+{n})"))
    return out, read


def _right_crc(whole: int, left: int, right_len: int) -> int:
    # crc(A||B) = shift(crc(A), len B) xor crc(B), so crc(B) = crc(A||B) xor combine(crc(A), 0).
    return whole ^ checksum.combine(BLOCK_ALGORITHM, left, 0, right_len)


def _reported_crc_mismatch(
    dst_info: ObjectInfo, known: dict[str, int], what: str
) -> Mismatch | None:
    """Compare the destination's service-reported CRC with a known value of the same algorithm."""
    reported = dst_info.checksum
    if reported is None:
        return None
    name = checksum.get_algorithm(reported.algorithm).name
    if name not in known or known[name] == reported.value:
        return None
    return Mismatch(
        0,
        dst_info.size,
        f"destination reports {reported}, {what} {ChecksumValue(name, known[name])}",
    )


def verify_sampled(
    src: Store,
    src_key: str,
    dst: Store,
    dst_key: str,
    *,
    part_boundaries: Sequence[int] = (),
    samples: int = 16,
    block_size: int = 1 << 20,
    seed: int | None = None,
    workers: int = 8,
    boundary_bytes: int | None = None,
) -> VerifyResult:
    """Structural check of a copy by sampled block CRCs (see the module docstring for limits).

    Args:
        src, src_key: the source object.
        dst, dst_key: the copy.
        part_boundaries: byte offsets where the transfer's parts met; one read straddles each.
        samples: random blocks beyond the first, last and boundary blocks.
        block_size: bytes per block.
        boundary_bytes: bytes read on each side of a boundary, see :func:`sample_blocks`.
        seed: RNG seed; ``None`` draws one, recorded in the result to reproduce the run.
        workers: concurrent ranged GETs (latency-bound across regions).

    Raises:
        StorageError: a store failed (ObjectNotFound, PreconditionFailed if an object changed
            while it was read...).
    """
    if seed is None:
        seed = secrets.randbits(63)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="verify") as pool:
        src_info, dst_info = _stat_both(pool, src, src_key, dst, dst_key)
        if src_info.size != dst_info.size:
            mismatch = _size_mismatch(src_info, dst_info)
            return _finish("sampled", dst_key, src_info, dst_info, [mismatch], seed=seed)
        mismatches: list[Mismatch] = []
        if src_info.checksum is not None:  # free when both services report the same algorithm
            name = checksum.get_algorithm(src_info.checksum.algorithm).name
            found = _reported_crc_mismatch(
                dst_info, {name: src_info.checksum.value}, "the source reports"
            )
            mismatches += [found] if found else []
        blocks, drawn = _plan(
            src_info.size, block_size, part_boundaries, samples, seed, boundary_bytes
        )
        s_side, d_side = _Side.of(src, src_key, src_info), _Side.of(dst, dst_key, dst_info)
        futures = [
            (off, n, pool.submit(s_side.crc, off, n), pool.submit(d_side.crc, off, n))
            for off, n in blocks
        ]
        differing, bytes_read = [], 0
        for off, n, fs, fd in futures:
            a, b = fs.result(), fd.result()
            bytes_read += a[1] + b[1]
            if a != b:
                differing.append((off, n, a[0], b[0]))
        if differing:
            narrowed, extra = _narrow(pool, s_side, d_side, differing[:MAX_ESCALATIONS])
            mismatches += narrowed
            bytes_read += extra
            mismatches += [
                Mismatch(off, n, "block CRC differs (not narrowed)")
                for off, n, _, _ in differing[MAX_ESCALATIONS:]
            ]
    covered = sum(n for _, n in blocks) == src_info.size
    p1, p10 = (
        (1.0, 1.0)
        if covered
        else (detection_probability(0.01, drawn), detection_probability(0.10, drawn))
    )
    return _finish(
        "sampled",
        dst_key,
        src_info,
        dst_info,
        mismatches,
        blocks_checked=len(blocks),
        bytes_read=bytes_read,
        seed=seed,
        detection_1pct=p1,
        detection_10pct=p10,
    )


def _ordered(
    pool: ThreadPoolExecutor,
    calls: Iterable[tuple[Callable[..., Any], tuple[Any, ...]]],
    window: int,
) -> Iterator[Any]:
    """Results of ``calls`` in order, with at most ``window`` submitted and unconsumed, so memory
    stays bounded (each running call holds one block; finished ones hold only a CRC)."""
    pending: deque[Future[Any]] = deque()
    for fn, args in calls:
        pending.append(pool.submit(fn, *args))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def verify_full(
    src: Store,
    src_key: str,
    dst: Store,
    dst_key: str,
    *,
    expected: ChecksumValue | None = None,
    block_size: int = 8 << 20,
    workers: int = 4,
) -> VerifyResult:
    """Re-read the whole destination and compare its CRC with the source's.

    Args:
        src, src_key: the source object (only ``stat`` when ``expected`` is given).
        dst, dst_key: the copy.
        expected: the source content's CRC computed at transfer time (any algorithm of
            :mod:`objstore.checksum`); ``None`` re-reads the source too, in CRC-64/NVME.
        block_size: bytes per ranged GET; memory stays around ``workers * block_size``.
        workers: concurrent ranged GETs.

    Raises:
        StorageError: a store failed.
        ValueError: ``expected`` names an unknown algorithm.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    algorithm = checksum.get_algorithm(expected.algorithm if expected else BLOCK_ALGORITHM).name
    workers = max(1, workers)
    with ThreadPoolExecutor(workers, thread_name_prefix="verify") as pool:
        src_info, dst_info = _stat_both(pool, src, src_key, dst, dst_key)
        size = dst_info.size
        if src_info.size != size:
            mismatch = _size_mismatch(src_info, dst_info)
            return _finish("full", dst_key, src_info, dst_info, [mismatch], crc_algorithm=algorithm)
        sides = [_Side.of(dst, dst_key, dst_info)]
        if expected is None:
            sides.append(_Side.of(src, src_key, src_info))
        ranges = [(off, min(block_size, size - off)) for off in range(0, size, block_size)]
        calls = ((side.crc, (off, n, algorithm)) for off, n in ranges for side in sides)
        results = _ordered(pool, calls, window=2 * workers)
        totals, lengths = [0] * len(sides), [0] * len(sides)
        block_diffs: list[Mismatch] = []
        for off, n in ranges:
            got = [next(results) for _ in sides]
            for i, (crc, length) in enumerate(got):
                totals[i] = checksum.combine(algorithm, totals[i], crc, length)
                lengths[i] += length
            # With both sides read, the per-block CRCs locate the damage for free.
            if len(got) == 2 and got[0] != got[1] and len(block_diffs) < MAX_REPORTED_BLOCKS:
                block_diffs.append(Mismatch(off, n, "block CRC differs"))
    dst_crc = totals[0]
    src_crc = expected.value if expected is not None else totals[1]
    mismatches = []
    if dst_crc != src_crc or lengths[0] != size:
        mismatches.append(
            Mismatch(
                0,
                size,
                f"whole-object CRC differs: source "
                f"{ChecksumValue(algorithm, src_crc)}, destination {ChecksumValue(algorithm, dst_crc)}",
            )
        )
    what = "the expected CRC is" if expected is not None else "the source's re-read CRC is"
    reported = _reported_crc_mismatch(dst_info, {algorithm: src_crc}, what)
    mismatches += ([reported] if reported else []) + block_diffs
    return _finish(
        "full",
        dst_key,
        src_info,
        dst_info,
        mismatches,
        blocks_checked=len(ranges),
        bytes_read=sum(lengths),
        src_crc=src_crc,
        dst_crc=dst_crc,
        crc_algorithm=algorithm,
    )


def _finish(
    mode: str,
    key: str,
    src_info: ObjectInfo,
    dst_info: ObjectInfo,
    mismatches: Sequence[Mismatch],
    **fields: Any,
) -> VerifyResult:
    """Build and log the result; unnamed fields keep their "nothing read" defaults."""
    result = VerifyResult(
        ok=not mismatches,
        mode=mode,
        key=key,
        size_src=src_info.size,
        size_dst=dst_info.size,
        mismatches=tuple(mismatches),
        **fields,
    )
    log.log(
        logging.INFO if result.ok else logging.WARNING,
        "verify %s (%s): %s; %d blocks, %d bytes read, seed %s",
        key,
        mode,
        "ok" if result.ok else f"{len(mismatches)} mismatches, first {mismatches[0]}",
        result.blocks_checked,
        result.bytes_read,
        result.seed,
    )
    return result
