"""The lean S3 data path: the SigV4 signer against botocore's, byte for byte, and the regex
ListObjectsV2 parser against ElementTree on the shapes servers send."""

from __future__ import annotations

import datetime
import hashlib
from unittest import mock
from urllib.parse import quote
from xml.etree import ElementTree

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from objstore import s3_data
from objstore.s3_data import EMPTY_SHA256, SigV4Signer, canonical_query, host_header

ACCESS = "AKIATESTREGIONA00001"
SECRET = "testSecretKeyForRcloneS3Server0000000001"
WHEN = datetime.datetime(2026, 11, 22, 12, 34, 56, tzinfo=datetime.UTC)

CASES = [
    ("GET", "http://127.0.0.1:9000", "bucket", "dir/file.bin", {}, b"", None),
    ("HEAD", "http://127.0.0.1:9000", "bucket", "a b/ü€ 漢字~+=.txt",
     {"x-amz-checksum-mode": "ENABLED"}, b"", None),
    ("GET", "http://localhost:80", "b", "k", {"Range": "bytes=0-99", "If-Match": '"abc"'}, b"",
     None),
    ("PUT", "https://s3.example.com", "my-bucket", "deep/key with  spaces",
     {"x-amz-checksum-crc64nvme": "AAAAAAAAAAA=", "x-amz-meta-babel-crc64nvme": "  12  34 ",
      "User-Agent": "ignored"}, b"x" * 1000, "session-token/with+chars=="),
    ("GET", "http://127.0.0.1:9000", "bucket", "",
     {}, b"", None),
]  # fmt: skip
QUERIES = [
    None,
    None,
    None,
    None,
    {"list-type": "2", "encoding-type": "url", "prefix": "p/ü x+y", "max-keys": "1000",
     "start-after": "p/ü x+y/a&b=c", "delimiter": "/"},
]  # fmt: skip


@pytest.mark.parametrize("case", range(len(CASES)))
def test_signer_matches_botocore_byte_for_byte(case: int) -> None:
    method, endpoint, bucket, key, headers, body, token = CASES[case]
    query = QUERIES[case]
    path = f"/{bucket}/{quote(key, safe='/~')}"
    qs = canonical_query(query) if query else ""
    url = f"{endpoint}{path}" + (f"?{qs}" if qs else "")

    request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    with mock.patch("botocore.auth.get_current_datetime", return_value=WHEN.replace(tzinfo=None)):
        S3SigV4Auth(Credentials(ACCESS, SECRET, token), "s3", "eu-west-1").add_auth(request)
    expected = dict(request.headers.items())

    signer = SigV4Signer(ACCESS, SECRET, "eu-west-1", token=token)
    payload = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
    got = signer.sign(method, host_header(endpoint), path, qs, headers, payload,
                      now=WHEN.timestamp())  # fmt: skip
    assert got == expected


def test_signer_caches_key_per_day_and_refreshes() -> None:
    signer = SigV4Signer(ACCESS, SECRET, "us-east-1")
    a = signer.sign("GET", "h", "/b/k", "", {}, EMPTY_SHA256)
    b = signer.sign("GET", "h", "/b/k", "", {}, EMPTY_SHA256)
    assert a["X-Amz-Date"][:8] == b["X-Amz-Date"][:8]
    later = signer.sign("GET", "h", "/b/k", "", {}, EMPTY_SHA256, now=WHEN.timestamp() + 86400)
    assert later["X-Amz-Date"] == "20261123T123456Z"
    assert "20261123/us-east-1/s3/aws4_request" in later["Authorization"]


def test_host_header() -> None:
    assert host_header("http://127.0.0.1:80") == "127.0.0.1"
    assert host_header("https://S3.Example.com:443/") == "s3.example.com"
    assert host_header("http://[::1]:9000") == "[::1]:9000"


NS = ' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'


def _page(entries: str, *, encoded: bool = True, truncated: bool = False, ns: str = NS) -> bytes:
    token = "<NextContinuationToken>tok/en+=</NextContinuationToken>" if truncated else ""
    enc = "<EncodingType>url</EncodingType>" if encoded else ""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult{ns}><Name>b</Name>'
        f"<Prefix>p%2F</Prefix><KeyCount>3</KeyCount><MaxKeys>1000</MaxKeys>{enc}"
        f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>{token}"
        f"{entries}</ListBucketResult>"
    ).encode()


def _contents(key: str, size: int = 5, *, order: str = "klesc") -> str:
    parts = {
        "k": f"<Key>{key}</Key>",
        "l": "<LastModified>2026-11-22T12:00:01.000Z</LastModified>",
        "e": "<ETag>&quot;0123abcd&quot;</ETag>",
        "s": f"<Size>{size}</Size>",
        "c": "<StorageClass>STANDARD</StorageClass>",
        "o": "<Owner><ID>x</ID><DisplayName>y</DisplayName></Owner>",
    }
    return "<Contents>" + "\n  ".join(parts[c] for c in order) + "</Contents>"


def _stamp(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else 0.0


def _etree(xml: bytes) -> s3_data.ListV2:
    """The old ElementTree parser: the oracle."""
    from urllib.parse import unquote_plus

    root = ElementTree.fromstring(xml)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    enc = (root.findtext(f"{ns}EncodingType") or "").lower() == "url"
    dec = unquote_plus if enc else (lambda t: t)
    contents = [
        (
            dec(i.findtext(f"{ns}Key") or ""),
            int(i.findtext(f"{ns}Size") or 0),
            _stamp(i.findtext(f"{ns}LastModified") or ""),
            (i.findtext(f"{ns}ETag") or "").strip('"'),
        )
        for i in root.iterfind(f"{ns}Contents")
    ]
    prefixes = [dec(p.findtext(f"{ns}Prefix") or "") for p in root.iterfind(f"{ns}CommonPrefixes")]
    return s3_data.ListV2(
        contents,
        prefixes,
        (root.findtext(f"{ns}IsTruncated") or "") == "true",
        root.findtext(f"{ns}NextContinuationToken"),
    )


KEYS = ["p/plain.bin", "p/a b+c", "p/ü€ 漢字", "p/<tag>&'\"", "p/%41", "p/line\tend"]


@pytest.mark.parametrize("order", ["klesc", "kesl", "klesco", "oklesc", "sk"])
@pytest.mark.parametrize("encoded", [True, False])
@pytest.mark.parametrize("truncated", [True, False])
def test_parse_list_v2_matches_elementtree(order: str, encoded: bool, truncated: bool) -> None:
    def enc(key: str) -> str:
        if encoded:
            return quote(key, safe="/")
        return key.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    entries = "".join(_contents(enc(k), i, order=order) for i, k in enumerate(KEYS))
    entries += "<CommonPrefixes><Prefix>" + enc("p/sub dir/") + "</Prefix></CommonPrefixes>"
    entries += "<CommonPrefixes><Prefix>" + enc("p/ü/") + "</Prefix></CommonPrefixes>"
    for ns in (NS, ""):
        xml = _page(entries, encoded=encoded, truncated=truncated, ns=ns)
        got = s3_data.parse_list_v2(xml)
        assert got == _etree(xml)
        if "s" in order and "k" in order:
            assert [c[0] for c in got.contents] == KEYS
        assert got.prefixes == ["p/sub dir/", "p/ü/"]
        assert got.token == ("tok/en+=" if truncated else None)


def test_parse_list_v2_empty_and_character_references() -> None:
    assert s3_data.parse_list_v2(_page("")) == s3_data.ListV2([], [], False, None)
    xml = _page(_contents("p/&#x1F600;&#233;&amp;"), encoded=False)
    assert s3_data.parse_list_v2(xml).contents[0][0] == "p/\U0001f600é&"


def test_parse_list_v2_keys_cannot_fake_result_fields() -> None:
    key = quote("p/<IsTruncated>true</IsTruncated>", safe="/")
    got = s3_data.parse_list_v2(_page(_contents(key)))
    assert got.truncated is False and got.contents[0][0] == "p/<IsTruncated>true</IsTruncated>"
