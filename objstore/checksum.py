"""The CRC checksums of the storage layer: computing, streaming, combining and header codecs.

Three algorithms, the ones object stores report natively:

* ``crc64xz``: CRC-64/XZ, what Aliyun OSS returns as ``x-oss-hash-crc64ecma`` (unsigned decimal).
* ``crc64nvme``: CRC-64/NVME, S3's ``x-amz-checksum-crc64nvme`` (base64 of 8 big-endian bytes).
* ``crc32c``: CRC-32C (Castagnoli), S3's ``x-amz-checksum-crc32c`` (base64 of 4 big-endian bytes).

Every value here is the *finished* CRC (init and xorout applied), so a value from a server, from
:func:`compute` or from :attr:`Checksum.value` can be compared, continued and combined directly.
:func:`combine` and :func:`combine_parts` join CRCs of adjacent byte ranges without the data,
which is how a multipart upload's whole-object CRC is checked against per-part CRCs.

The hot path is native: awscrt for crc64nvme/crc32c, anycrc for crc64xz (see ``_SPECS`` for
why). :func:`reference` returns crcmod, the slow reference implementation, as the test oracle.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import anycrc
import crcmod
from awscrt import checksums as _awscrt

# crcmod's __init__ star-imports its submodule, which rebinds ``crcmod.crcmod`` to the package;
# import the flag from the submodule by its full name instead.
from crcmod.crcmod import _usingExtension as _CRCMOD_USES_EXTENSION

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class AlgorithmSpec:
    """Everything that differs between the algorithms; the code paths are shared.

    Attributes:
        name: registry key (``"crc64xz"``...).
        width: CRC width in bits.
        check: CRC of ``b"123456789"``, the catalogue's published check value.
        header: the HTTP header a service reports it in.
        header_format: ``"decimal"`` (OSS) or ``"base64"`` of the big-endian bytes (S3).
        reference_poly: crcmod polynomial, with the implicit x^width bit set.
        backend: which native library computes it (``"anycrc"`` or ``"awscrt"``).
        releases_gil: whether that library drops the GIL while hashing, so threads scale.
        native_calc: ``fn(data, crc) -> crc``, continuing from a finished CRC value.
        native_combine: ``fn(crc_a, crc_b, len_b) -> crc of A||B``.
    """

    name: str
    width: int
    check: int
    header: str
    header_format: Literal["decimal", "base64"]
    reference_poly: int
    backend: str
    releases_gil: bool
    native_calc: Callable[[Any, int], int]
    native_combine: Callable[[int, int, int], int]

    @property
    def nbytes(self) -> int:
        """Size of the CRC in bytes (8 or 4)."""
        return self.width // 8

    @property
    def mask(self) -> int:
        """All ones over ``width`` bits; also the init and xorout of all three algorithms."""
        return (1 << self.width) - 1


def _spec(
    name: str,
    width: int,
    model: str,
    poly: int,
    check: int,
    header: str,
    header_format: Literal["decimal", "base64"],
    awscrt_calc: Any = None,
) -> AlgorithmSpec:
    native = anycrc.Model(model)
    spec = AlgorithmSpec(
        name=name,
        width=width,
        check=check,
        header=header,
        header_format=header_format,
        reference_poly=(1 << width) | poly,
        backend="awscrt" if awscrt_calc else "anycrc",
        releases_gil=awscrt_calc is not None,
        native_calc=awscrt_calc or native.calc,
        # anycrc's combine is O(log n) in len_b (cached x^(8n) mod P) and needs no data; awscrt
        # has combines too, but one implementation for all three keeps combine uniform.
        native_combine=native.combine,
    )
    # A native build that disagrees with the catalogue must fail here, not pass bad data as good.
    for calc in (spec.native_calc, native.calc):
        if calc(b"123456789", 0) != check:
            raise ImportError(f"native {name} ({spec.backend}, anycrc) gives a wrong check value")
    return spec


# Why awscrt for crc64nvme/crc32c: anycrc 2.1.0 holds the GIL while hashing (its Cython calc has
# no ``nogil`` block). Measured here with 256 MiB buffers: a pure-Python thread was starved to
# ~3-4% of its idle loop rate while another thread ran anycrc, but kept near its idle rate beside
# awscrt, which releases the GIL. awscrt was also 2-3x faster than anycrc at every size from 16 B
# to 1 MiB, so it is the only path for those two (no size threshold). awscrt has no CRC-64/XZ,
# so crc64xz stays on anycrc: threads do not speed it up, processes would.
_SPECS = (
    _spec(
        name="crc64xz",
        width=64,
        model="CRC64-XZ",
        poly=0x42F0E1EBA9EA3693,
        check=0x995DC9BBDF1939FA,
        header="x-oss-hash-crc64ecma",
        header_format="decimal",
    ),
    _spec(
        name="crc64nvme",
        width=64,
        model="CRC64-NVME",
        poly=0xAD93D23594C93659,
        check=0xAE8B14860A799888,
        header="x-amz-checksum-crc64nvme",
        header_format="base64",
        awscrt_calc=_awscrt.crc64nvme,
    ),
    _spec(
        name="crc32c",
        width=32,
        model="CRC32C",
        poly=0x1EDC6F41,
        check=0xE3069283,
        header="x-amz-checksum-crc32c",
        header_format="base64",
        awscrt_calc=_awscrt.crc32c,
    ),
)

#: The algorithms by name, read-only.
ALGORITHMS: Mapping[str, AlgorithmSpec] = MappingProxyType({s.name: s for s in _SPECS})


def get_algorithm(name: str | AlgorithmSpec) -> AlgorithmSpec:
    """Look up an algorithm by name (case-insensitive, so S3's ``"CRC64NVME"`` works too).

    Raises:
        ValueError: ``name`` is not one of :data:`ALGORITHMS`.
    """
    if isinstance(name, AlgorithmSpec):
        return name
    try:
        return ALGORITHMS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown checksum algorithm {name!r}; valid: {', '.join(ALGORITHMS)}"
        ) from None


def _bytes_view(data: Buffer) -> Buffer:
    # anycrc takes a Cython ``const unsigned char[:]``, which rejects memoryviews of other
    # formats ('b', 'I'...); cast() re-labels them as bytes without copying. A str would be
    # silently UTF-8 encoded by both libraries, hiding a caller bug, so refuse it.
    if isinstance(data, memoryview):
        return data if data.format == "B" and data.ndim == 1 else data.cast("B")
    if isinstance(data, str):
        raise TypeError("checksums take bytes-like data, not str")
    return data


def _check_value(spec: AlgorithmSpec, value: int) -> int:
    # anycrc would raise OverflowError past 64 bits and silently truncate a too-wide crc32c.
    if not 0 <= value <= spec.mask:
        raise ValueError(f"{value!r} is not a {spec.width}-bit {spec.name} value")
    return value


def compute(name: str | AlgorithmSpec, data: Buffer, crc: int = 0) -> int:
    """One-shot CRC of ``data``, optionally continuing from ``crc``, the CRC of preceding bytes.

    Args:
        name: algorithm name, see :data:`ALGORITHMS`.
        data: bytes, bytearray or memoryview; memoryviews are read in place.
        crc: finished CRC of the bytes before ``data`` (0 is the CRC of no bytes).

    Returns:
        The finished CRC as an unsigned int.
    """
    spec = get_algorithm(name)
    return spec.native_calc(_bytes_view(data), _check_value(spec, crc))


def combine(name: str | AlgorithmSpec, crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC of ``A || B`` from ``crc(A)``, ``crc(B)`` and ``len(B)``, in O(log len_b), no data.

    Raises:
        ValueError: a CRC out of range for the algorithm, or a negative length.
    """
    spec = get_algorithm(name)
    if len_b < 0:
        raise ValueError(f"negative length {len_b}")
    return spec.native_combine(_check_value(spec, crc_a), _check_value(spec, crc_b), len_b)


def combine_parts(name: str | AlgorithmSpec, parts: Iterable[tuple[int, int]]) -> int:
    """Whole-object CRC from the ``(crc, length)`` of its consecutive parts, in order.

    This is the multipart case: S3/OSS report (or we computed) one CRC per part, and the
    object's full CRC follows without reading it again. No parts gives the CRC of no bytes, 0.
    """
    spec = get_algorithm(name)
    total = 0
    for crc, length in parts:
        total = combine(spec, total, crc, length)
    return total


class Checksum:
    """A running CRC: feed it with :meth:`update`, read :attr:`value` or :meth:`digest`.

    Not thread-safe; give each thread its own and :meth:`combine` them afterwards.

    Attributes:
        spec: the algorithm.
        value: finished CRC of everything fed so far.
        length: number of bytes fed so far.
    """

    __slots__ = ("length", "spec", "value")

    def __init__(self, name: str | AlgorithmSpec, data: Buffer = b"") -> None:
        self.spec = get_algorithm(name)
        self.value = 0
        self.length = 0
        self.update(data)

    @property
    def name(self) -> str:
        """The algorithm's registry name."""
        return self.spec.name

    def update(self, data: Buffer) -> None:
        """Feed the next bytes; a memoryview is read in place, never copied."""
        view = _bytes_view(data)
        self.value = self.spec.native_calc(view, self.value)
        self.length += len(view)

    def combine(self, other: Checksum) -> None:
        """Append the bytes ``other`` hashed, without the data (for parallel hashing)."""
        if other.spec is not self.spec:
            raise ValueError(f"cannot combine {other.spec.name} into {self.spec.name}")
        self.value = self.spec.native_combine(self.value, other.value, other.length)
        self.length += other.length

    def digest(self) -> bytes:
        """The CRC as big-endian bytes (8 or 4), the form S3 base64-encodes."""
        return self.value.to_bytes(self.spec.nbytes, "big")

    def hexdigest(self) -> str:
        """The CRC as zero-padded lowercase hex."""
        return self.digest().hex()

    def header(self) -> str:
        """The CRC as the service's header value, see :func:`encode_header`."""
        return encode_header(self.spec.name, self.value)

    def copy(self) -> Checksum:
        """An independent copy, e.g. to read a prefix's CRC and keep hashing."""
        new = Checksum(self.spec)
        new.value, new.length = self.value, self.length
        return new

    def __repr__(self) -> str:
        return f"Checksum({self.spec.name!r}, value={self.hexdigest()}, length={self.length})"


def encode_header(name: str | AlgorithmSpec, value: int) -> str:
    """Format a CRC the way its service's header carries it.

    Decimal for ``crc64xz`` (OSS ``x-oss-hash-crc64ecma``); base64 of the big-endian bytes
    for ``crc64nvme`` and ``crc32c`` (S3 ``x-amz-checksum-*``).

    Raises:
        ValueError: unknown algorithm, or ``value`` out of range.
    """
    spec = get_algorithm(name)
    _check_value(spec, value)
    if spec.header_format == "decimal":
        return str(value)
    return base64.b64encode(value.to_bytes(spec.nbytes, "big")).decode("ascii")


def decode_header(name: str | AlgorithmSpec, text: str) -> int:
    """Parse a service's checksum header value (see :func:`encode_header`) into an int.

    Raises:
        ValueError: unknown algorithm, or ``text`` is not a well-formed value for it.
    """
    spec = get_algorithm(name)
    text = text.strip()
    if spec.header_format == "decimal":
        # isdigit() alone accepts non-ASCII digits like '²'; int() would accept '+1' and '1_0'.
        if not (text.isascii() and text.isdigit()) or int(text) > spec.mask:
            raise ValueError(
                f"malformed {spec.header} header {text!r}: expected an unsigned "
                f"{spec.width}-bit decimal integer"
            )
        return int(text)
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"malformed {spec.header} header {text!r}: not base64 ({exc})") from None
    if len(raw) != spec.nbytes:
        raise ValueError(
            f"malformed {spec.header} header {text!r}: decodes to {len(raw)} "
            f"bytes, expected {spec.nbytes}"
        )
    return int.from_bytes(raw, "big")


def reference_uses_extension() -> bool:
    """Whether crcmod runs its C extension; without it the oracle is pure Python, far slower."""
    return bool(_CRCMOD_USES_EXTENSION)


def reference(name: str | AlgorithmSpec) -> Callable[..., int]:
    """The crcmod implementation of an algorithm: the oracle for tests and the benchmark.

    Returns:
        ``fn(data, crc=0) -> crc``, same contract as :func:`compute`. All three are reflected with
        init = xorout = all ones: crcmod's ``initCrc`` is init already xored with ``xorOut``, so 0.
    """
    spec = get_algorithm(name)
    if not reference_uses_extension():
        log.warning("crcmod runs without its C extension; the reference CRC will be slow")
    fn: Callable[..., int] = crcmod.mkCrcFun(
        spec.reference_poly, initCrc=0, rev=True, xorOut=spec.mask
    )
    return fn
