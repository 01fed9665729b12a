"""Tests of objstore.checksum: the native fast path against published values and crcmod."""

from __future__ import annotations

import array
import itertools
import random

import pytest

from objstore.checksum import (
    ALGORITHMS,
    Checksum,
    combine,
    combine_parts,
    compute,
    decode_header,
    encode_header,
    get_algorithm,
    reference,
)

pytestmark = pytest.mark.timeout(60)

NAMES = ["crc64xz", "crc64nvme", "crc32c"]
# Published check values (CRC catalogue, reveng), written out here rather than read from the
# module so a wrong spec table cannot agree with itself.
CHECK = {"crc64xz": 0x995DC9BBDF1939FA, "crc64nvme": 0xAE8B14860A799888, "crc32c": 0xE3069283}
WIDTH = {"crc64xz": 64, "crc64nvme": 64, "crc32c": 32}
MiB = 1 << 20
# Edge lengths around the 8/16/64-byte strides native CRC kernels fold by, then larger ones.
LENGTHS = [
    0,
    1,
    2,
    3,
    7,
    8,
    9,
    15,
    16,
    17,
    31,
    32,
    33,
    63,
    64,
    65,
    127,
    128,
    129,
    255,
    256,
    257,
    1023,
    4095,
    4096,
    4097,
    65535,
    65537,
    MiB - 1,
    3 * MiB + 5,
]


@pytest.fixture(params=NAMES)
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def rng(name: str) -> random.Random:
    return random.Random(f"objstore-checksum-{name}")


def test_registry_names() -> None:
    assert set(ALGORITHMS) == set(NAMES)
    for n in NAMES:
        assert get_algorithm(n).name == n
        assert get_algorithm(n).width == WIDTH[n]
    assert get_algorithm("CRC64NVME") is ALGORITHMS["crc64nvme"]


def test_header_names() -> None:
    assert ALGORITHMS["crc64xz"].header == "x-oss-hash-crc64ecma"
    assert ALGORITHMS["crc64nvme"].header == "x-amz-checksum-crc64nvme"
    assert ALGORITHMS["crc32c"].header == "x-amz-checksum-crc32c"


def test_check_value_fast_path(name: str) -> None:
    assert compute(name, b"123456789") == CHECK[name]
    assert Checksum(name, b"123456789").value == CHECK[name]
    assert get_algorithm(name).check == CHECK[name]


def test_check_value_reference(name: str) -> None:
    assert reference(name)(b"123456789") == CHECK[name]


def test_empty_is_zero(name: str) -> None:
    assert compute(name, b"") == 0
    assert Checksum(name).value == 0
    assert reference(name)(b"") == 0


def test_fast_path_matches_reference(name: str, rng: random.Random) -> None:
    ref = reference(name)
    lengths = LENGTHS + [rng.randrange(1, 2 * MiB) | 1 for _ in range(8)]
    for n in lengths:
        data = rng.randbytes(n)
        expected = ref(data)
        assert compute(name, data) == expected, n
        assert compute(name, bytearray(data)) == expected, n
        assert compute(name, memoryview(data)) == expected, n


def test_memoryview_slices_and_formats(name: str, rng: random.Random) -> None:
    ref = reference(name)
    data = rng.randbytes(10_001)
    view = memoryview(data)
    for start, stop in [(0, 0), (1, 2), (3, 4000), (4001, 10_001), (17, 9999)]:
        assert compute(name, view[start:stop]) == ref(data[start:stop])
    # Views whose items are not unsigned bytes are hashed as their raw bytes.
    assert compute(name, view.cast("b")) == ref(data)
    words = array.array("I", data[:4000])
    assert compute(name, memoryview(words)) == ref(words.tobytes())
    assert Checksum(name, memoryview(words)).length == 4000  # bytes, not 1000 items
    grid = memoryview(data[:4000]).cast("B", (40, 100))
    assert compute(name, grid) == ref(data[:4000])


def test_streaming_random_chunks(name: str, rng: random.Random) -> None:
    ref = reference(name)
    for total in [0, 1, 9, 65_537, 2 * MiB + 3]:
        data = rng.randbytes(total)
        view = memoryview(data)
        c = Checksum(name)
        pos = 0
        while pos < total:
            step = rng.choice([0, 1, 7, 8, 9, rng.randrange(1, 200_000)])
            c.update(view[pos : pos + step])
            pos += step
            assert c.length == min(pos, total)
        assert c.value == ref(data)
        assert c.length == total


def test_continue_from_crc(name: str, rng: random.Random) -> None:
    ref = reference(name)
    a, b = rng.randbytes(1000), rng.randbytes(333)
    assert compute(name, b, compute(name, a)) == ref(a + b)
    assert ref(b, ref(a)) == ref(a + b)  # the oracle's own continuation contract


def test_combine_matches_reference(name: str, rng: random.Random) -> None:
    ref = reference(name)
    for total in [0, 1, 2, 9, 100, 4097, MiB + 7]:
        data = rng.randbytes(total)
        splits = {0, total} | {rng.randrange(total + 1) for _ in range(4)}
        for cut in sorted(splits):
            a, b = data[:cut], data[cut:]
            assert combine(name, ref(a), ref(b), len(b)) == ref(data), (total, cut)


def test_combine_is_associative_for_huge_lengths(name: str, rng: random.Random) -> None:
    # No data at these sizes: associativity still pins down the x^(8n) shift for large n.
    mask = (1 << WIDTH[name]) - 1
    for _ in range(20):
        a, b, c = (rng.randrange(mask + 1) for _ in range(3))
        lb, lc = rng.randrange(1 << 45), rng.randrange(1 << 45)
        left = combine(name, combine(name, a, b, lb), c, lc)
        right = combine(name, a, combine(name, b, c, lc), lb + lc)
        assert left == right
    assert combine(name, a, 0, 0) == a  # appending nothing changes nothing


def test_combine_parts(name: str, rng: random.Random) -> None:
    ref = reference(name)
    data = rng.randbytes(3 * MiB + 11)
    cuts = sorted({0, len(data), 5, *(rng.randrange(len(data)) for _ in range(6))})
    parts = [data[s:e] for s, e in itertools.pairwise(cuts)]
    parts[1:1] = [b""]  # an empty part, anywhere, must change nothing
    parts.append(b"")
    assert combine_parts(name, [(ref(p), len(p)) for p in parts]) == ref(data)
    assert combine_parts(name, []) == 0
    assert combine_parts(name, [(ref(data), len(data))]) == ref(data)


def test_checksum_combine_and_copy(name: str, rng: random.Random) -> None:
    ref = reference(name)
    a, b = rng.randbytes(70_000), rng.randbytes(12_345)
    first = Checksum(name, a)
    snapshot = first.copy()
    first.combine(Checksum(name, b))
    assert first.value == ref(a + b)
    assert first.length == len(a) + len(b)
    assert snapshot.value == ref(a)  # the copy did not follow the original
    snapshot.update(b)
    assert snapshot.value == ref(a + b)
    assert snapshot.length == len(a) + len(b)
    other = "crc32c" if name != "crc32c" else "crc64xz"
    with pytest.raises(ValueError, match="cannot combine"):
        first.combine(Checksum(other))


def test_digest_forms(name: str) -> None:
    c = Checksum(name, b"123456789")
    assert c.digest() == CHECK[name].to_bytes(WIDTH[name] // 8, "big")
    assert c.hexdigest() == f"{CHECK[name]:0{WIDTH[name] // 4}x}"
    assert c.header() == encode_header(name, CHECK[name])


def test_known_headers() -> None:
    assert encode_header("crc64xz", compute("crc64xz", b"123456789")) == "11051210869376104954"
    assert encode_header("crc64nvme", compute("crc64nvme", b"123456789")) == "rosUhgp5mIg="
    assert encode_header("crc32c", compute("crc32c", b"123456789")) == "4waSgw=="
    assert decode_header("crc64xz", "11051210869376104954") == CHECK["crc64xz"]
    assert decode_header("crc64xz", " 11051210869376104954\r\n") == CHECK["crc64xz"]
    assert decode_header("crc64nvme", "rosUhgp5mIg=") == CHECK["crc64nvme"]
    assert decode_header("crc32c", "4waSgw==") == CHECK["crc32c"]
    assert encode_header("crc64nvme", 0) == "AAAAAAAAAAA="
    assert encode_header("crc32c", 1) == "AAAAAQ=="  # big-endian: the low byte is last


def test_header_round_trip(name: str, rng: random.Random) -> None:
    mask = (1 << WIDTH[name]) - 1
    for value in [0, 1, 255, 256, mask, mask - 1, *(rng.randrange(mask + 1) for _ in range(200))]:
        text = encode_header(name, value)
        assert decode_header(name, text) == value
    assert encode_header("crc64xz", 7) == "7"  # OSS: plain decimal, no padding


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "-1",
        "+1",
        "1_000",
        "0x10",
        "1.0",
        "1e3",
        "\uff11\uff12",
        "\u00b2",
        "18446744073709551616",  # 2**64
    ],
)
def test_bad_decimal_header(text: str) -> None:
    with pytest.raises(ValueError, match="malformed x-oss-hash-crc64ecma"):
        decode_header("crc64xz", text)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("crc64nvme", ""),
        ("crc64nvme", "not base64!"),
        ("crc64nvme", "rosUhgp5mIg"),
        ("crc64nvme", "4waSgw=="),
        ("crc64nvme", "AAAAAAAAAAAA"),
        ("crc64nvme", "11051210869376104954"),
        ("crc32c", ""),
        ("crc32c", "4waSgw="),
        ("crc32c", "rosUhgp5mIg="),
        ("crc32c", "4wa$gw=="),
    ],
)
def test_bad_base64_header(name: str, text: str) -> None:
    with pytest.raises(ValueError, match=f"malformed {ALGORITHMS[name].header}"):
        decode_header(name, text)


def test_out_of_range_values(name: str) -> None:
    too_big = 1 << WIDTH[name]
    for bad in (-1, too_big):
        with pytest.raises(ValueError, match="bit"):
            encode_header(name, bad)
        with pytest.raises(ValueError):
            combine(name, bad, 0, 0)
        with pytest.raises(ValueError):
            compute(name, b"x", bad)
    with pytest.raises(ValueError, match="negative"):
        combine(name, 0, 0, -1)


def test_str_data_is_refused(name: str) -> None:
    with pytest.raises(TypeError):
        compute(name, "123456789")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call",
    [
        lambda: get_algorithm("md5"),
        lambda: compute("crc64", b""),
        lambda: Checksum("sha256"),
        lambda: combine("crc16", 0, 0, 0),
        lambda: encode_header("crc32", 0),
        lambda: decode_header("adler32", "0"),
        lambda: reference("crc64ecma"),
    ],
)
def test_unknown_algorithm(call: object) -> None:
    with pytest.raises(ValueError, match="unknown checksum algorithm") as info:
        call()  # type: ignore[operator]
    for n in NAMES:
        assert n in str(info.value)
