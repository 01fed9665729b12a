"""URL parsing, key checks, opening stores from URLs, profiles from TOML + environment, and
keeping secrets out of reprs, messages and logs."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from objstore import (
    Config,
    ConfigError,
    InvalidKey,
    InvalidURL,
    Profile,
    Secret,
    StorageError,
    StoreURL,
    check_key,
    open_object,
    open_store,
    parse_url,
)
from objstore.fsspec_store import FsspecStore
from objstore.local import LocalStore
from objstore.oss import OSSStore
from objstore.s3 import S3Store
from objstore.url import check_prefix

pytestmark = pytest.mark.timeout(60)

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYzEXAMPLEKEY"
TOKEN = "FwoGZXIvYXdzEXAMPLESESSIONTOKEN0123456789"
CLOSED = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused


def _no_env_config(profiles: dict | None = None) -> Config:
    return Config.from_mapping({"profiles": profiles or {}}, env={})


# -- parse_url -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket", StoreURL("s3", None, "bucket", "")),
        ("s3://bucket/", StoreURL("s3", None, "bucket", "")),
        ("s3://bucket/prefix", StoreURL("s3", None, "bucket", "prefix/")),
        ("s3://prof@bucket/a/b/", StoreURL("s3", "prof", "bucket", "a/b/")),
        ("oss://p@bkt/x", StoreURL("oss", "p", "bkt", "x/")),
        ("S3://bucket/x", StoreURL("s3", None, "bucket", "x/")),
        ("s3://b/dir/", StoreURL("s3", None, "b", "dir/")),
        ("s3://bucket/a%20b/", StoreURL("s3", None, "bucket", "a b/")),
        ("file:///abs/dir", StoreURL("file", None, "/abs/dir", "")),
        ("file://localhost/abs", StoreURL("file", None, "/abs", "")),
        ("/abs/path", StoreURL("file", None, "/abs/path", "")),
        ("memory://bkt/p", StoreURL("memory", None, "bkt", "p/")),
    ],
)
def test_parse_url(url: str, expected: StoreURL) -> None:
    assert parse_url(url) == expected


def test_parse_relative_path_becomes_absolute_file_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    parsed = parse_url("./rel")
    assert parsed == StoreURL("file", None, str(tmp_path / "rel"), "")
    assert os.path.isabs(parsed.bucket)
    assert parse_url("rel/sub").bucket == str(tmp_path / "rel" / "sub")


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("foo://x", "unknown scheme 'foo'"),
        ("s3:bucket", "s3://"),
        ("s3://", "no bucket"),
        ("s3:///x", "no bucket"),
        ("s3://bad bucket/", "not a valid bucket name"),
        ("s3://-bucket/", "not a valid bucket name"),
        ("s3://b/../x", "'..'"),
        ("s3://b/a/../../x", "'..'"),
        ("s3://b/a/..", "'..'"),
        ("s3://b//", "empty"),
        ("s3://b/a//c", "empty path segment"),
        ("s3://b/a/%00/", "NUL"),
        ("s3://b/.objstore-tmp/", "reserved"),
        ("file://host/x", "host"),
        ("s3://bad prof@bucket/", "bad profile name"),
        ("s3://@bucket/", "bad profile name"),
        ("oss://a:b@bucket/", "bad profile name"),
        ("file://p@/tmp", "host"),
        ("", "empty"),
    ],
)
def test_parse_url_errors_are_invalid_url_naming_the_problem(url: str, needle: str) -> None:
    with pytest.raises(InvalidURL) as info:
        parse_url(url)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ConfigError)
    assert not isinstance(info.value, StorageError)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "s3://bucket/",
        "s3://bucket/a/b/",
        "s3://prof@bucket/a/b/",
        "oss://p@bkt/x/",
        "oss://bkt/dir with space/",
        "s3://bucket/%25literal-percent/",
        "s3://bucket/a%2541/",
        "file:///abs/dir",
        "file:///abs/dir%2541",
        "memory://bkt/p/",
    ],
)
def test_str_round_trips_through_parse_url(url: str) -> None:
    parsed = parse_url(url)
    again = parse_url(str(parsed))
    assert again == parsed
    assert str(again) == str(parsed)


def test_percent_in_prefix_is_decoded_once() -> None:
    parsed = parse_url("s3://bucket/a%2541/")
    assert parsed.prefix == "a%41/"
    assert parse_url(str(parsed)).prefix == "a%41/"


def test_child_names_the_object() -> None:
    assert parse_url("s3://p@bkt/x").child("k") == "s3://p@bkt/x/k"
    assert parse_url("s3://bkt").child("k") == "s3://bkt/k"
    assert parse_url("file:///abs/dir").child("k") == "file:///abs/dir/k"


# -- check_key / check_prefix ---------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["a", "a/b/c.bin", "dir/", "ünïcødé/日本語.txt", "a b", ".hidden", "a/.b", "...", "a..b"]
)
def test_check_key_accepts(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize(
    "key",
    ["", "/abs", "..", "a/../b", "a/..", "../a", "a\x00b", ".objstore-tmp", "a/.objstore-part/b"],
)
def test_check_key_rejects(key: str) -> None:
    with pytest.raises(InvalidKey) as info:
        check_key(key, url="s3://bkt/")
    assert info.value.url == "s3://bkt/"


def test_check_key_rejects_non_string() -> None:
    with pytest.raises(InvalidKey):
        check_key(None)  # type: ignore[arg-type]


def test_check_prefix() -> None:
    assert check_prefix("") == ""
    assert check_prefix("a/b/") == "a/b/"
    for bad in ("/", "/a/", "../", "a/../", ".objstore-x/"):
        with pytest.raises(InvalidKey):
            check_prefix(bad)


# -- open_store / open_object ------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[tuple[str, socket.socket]]:
    """A listening socket nobody accepts on: a connection to it shows up as a pending accept."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", sock
    finally:
        sock.close()


def _assert_no_connection(sock: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        conn, _ = sock.accept()
        conn.close()


def _remote_config(endpoint: str, **extra: object) -> Config:
    table = {
        "endpoint": endpoint,
        "region": "us-east-1",
        "access_key_id": "AKIDEXAMPLE",
        "secret_access_key": SECRET,
        **extra,
    }
    return _no_env_config({"p": table})


@pytest.mark.parametrize(("scheme", "cls"), [("s3", S3Store), ("oss", OSSStore)])
def test_open_remote_store_makes_no_request(
    scheme: str, cls: type, listener: tuple[str, socket.socket]
) -> None:
    endpoint, sock = listener
    store = open_store(f"{scheme}://p@bucket-x/pre", _remote_config(endpoint))
    assert type(store) is cls
    assert store.url == StoreURL(scheme, "p", "bucket-x", "pre/")
    assert isinstance(store, S3Store | OSSStore) and store.prefix == "pre/"
    _assert_no_connection(sock)


def test_open_store_on_closed_endpoint_succeeds() -> None:
    for scheme, cls in (("s3", S3Store), ("oss", OSSStore)):
        store = open_store(f"{scheme}://p@bucket-x/", _remote_config(CLOSED))
        assert isinstance(store, cls)


def test_open_store_profile_reaches_the_client() -> None:
    config = _remote_config(CLOSED, max_attempts=2, retry_deadline=7.5)
    store = open_store("s3://p@bucket-x/", config)
    assert isinstance(store, S3Store)
    assert store.client.meta.endpoint_url == CLOSED
    assert store.retry_policy.max_attempts == 2
    assert store.retry_policy.deadline == 7.5


def test_open_local_store(tmp_path: Path) -> None:
    for url in (f"file://{tmp_path}", str(tmp_path), f"file://localhost{tmp_path}"):
        store = open_store(url, _no_env_config())
        assert type(store) is LocalStore
        assert store.url == StoreURL("file", None, str(tmp_path), "")


def test_open_fsspec_store() -> None:
    store = open_store("memory://bkt-open/p", _no_env_config())
    assert type(store) is FsspecStore
    assert store.url == StoreURL("memory", None, "bkt-open", "p/")


def test_open_store_unknown_profile() -> None:
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        open_store("s3://nope@bucket/", _no_env_config())


def test_file_url_with_profile_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidURL, match="no profile"):
        open_store(StoreURL("file", "p", str(tmp_path), ""), _no_env_config())
    with pytest.raises(InvalidURL):
        open_store(f"file://p@{tmp_path}", _no_env_config())


def test_open_object_splits_directory_and_name() -> None:
    store, key = open_object("s3://b/dir/file.bin", _no_env_config())
    assert isinstance(store, S3Store)
    assert store.url == StoreURL("s3", None, "b", "dir/")
    assert key == "file.bin"

    store, key = open_object("oss://p@bkt/a/b/c.txt", _remote_config(CLOSED))
    assert isinstance(store, OSSStore)
    assert store.url == StoreURL("oss", "p", "bkt", "a/b/")
    assert key == "c.txt"

    store, key = open_object("s3://bkt/top.bin", _no_env_config())
    assert store.url == StoreURL("s3", None, "bkt", "")
    assert key == "top.bin"


def test_open_object_local(tmp_path: Path) -> None:
    store, key = open_object(str(tmp_path / "d" / "f.bin"), _no_env_config())
    assert isinstance(store, LocalStore)
    assert store.url.bucket == str(tmp_path / "d")
    assert key == "f.bin"


@pytest.mark.parametrize("url", ["s3://b", "s3://b/", "oss://p@bkt"])
def test_open_object_needs_a_key(url: str) -> None:
    with pytest.raises(InvalidURL, match="names a bucket, not an object"):
        open_object(url, _remote_config(CLOSED))


# -- Config ---------------------------------------------------------------------------------

TWO_PROFILES = """
[profiles.region-a]
endpoint = "http://127.0.0.1:9000"
region = "us-east-1"
access_key_id = "AKIA-A"
secret_access_key = "secret-a"
max_attempts = 3
connect_timeout = 2.5

[profiles.region-b]
endpoint = "http://127.0.0.1:9001"
addressing_style = "virtual"
max_pool_connections = 32
storage_options = { anon = true }
"""


def _write(tmp_path: Path, text: str, name: str = "objstore.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_two_profiles(tmp_path: Path) -> None:
    path = _write(tmp_path, TWO_PROFILES)
    config = Config.load(path, env={})
    assert config.path == path
    assert set(config.profiles) == {"region-a", "region-b"}

    a = config.profile("region-a", "s3")
    assert a.name == "region-a"
    assert a.endpoint == "http://127.0.0.1:9000"
    assert a.region == "us-east-1"
    assert a.access_key_id == "AKIA-A"
    assert isinstance(a.secret_access_key, Secret)
    assert a.secret_access_key.reveal() == "secret-a"
    assert a.max_attempts == 3 and isinstance(a.max_attempts, int)
    assert a.connect_timeout == 2.5
    assert a.addressing_style == "path"  # default

    b = config.profile("region-b", "s3")
    assert b.addressing_style == "virtual"
    assert b.max_pool_connections == 32
    assert dict(b.storage_options) == {"anon": True}
    assert b.secret_access_key.reveal() == ""
    assert not b.secret_access_key


def test_integer_for_float_field_is_a_float(tmp_path: Path) -> None:
    config = Config.load(_write(tmp_path, "[profiles.x]\nread_timeout = 30\n"), env={})
    value = config.profile("x").read_timeout
    assert value == 30.0 and isinstance(value, float)


def test_unknown_key_names_it_and_lists_valid_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, '[profiles.x]\nendpoint = "http://h"\nendpiont = "http://h"\n')
    with pytest.raises(ConfigError) as info:
        Config.load(path, env={})
    message = str(info.value)
    assert "'endpiont'" in message
    assert str(path) in message
    for valid in ("endpoint", "region", "secret_access_key", "max_attempts", "storage_options"):
        assert valid in message


def test_unknown_top_level_key_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, '[profile.x]\nendpoint = "http://h"\n')  # singular: a typo
    with pytest.raises(ConfigError, match="'profile'"):
        Config.load(path, env={})


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('max_attempts = "three"', "max_attempts must be a number"),
        ('connect_timeout = "fast"', "connect_timeout must be a number"),
        ("connect_timeout = true", "connect_timeout must be a number"),
        ("max_attempts = 2.5", "max_attempts must be a whole number"),
        ("max_attempts = [1]", "max_attempts must be a number"),
        ("read_timeout = { s = 1 }", "read_timeout must be a number"),
        ("endpoint = 9000", "endpoint must be a string"),
        ("region = true", "region must be a string"),
        ("access_key_id = 12", "access_key_id must be a string"),
        ("secret_access_key = 12", "secret_access_key must be a string"),
        ("storage_options = 1", "storage_options must be a table"),
    ],
)
def test_wrong_types(tmp_path: Path, line: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        Config.load(_write(tmp_path, f"[profiles.x]\n{line}\n"), env={})


def test_profiles_must_be_tables() -> None:
    with pytest.raises(ConfigError, match="must be a table"):
        Config.from_mapping({"profiles": {"x": 1}}, env={})
    with pytest.raises(ConfigError, match="must be a table"):
        Config.from_mapping({"profiles": 1}, env={})


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('addressing_style = "x"', "addressing_style"),
        ("connect_timeout = -1", "connect_timeout must be > 0"),
        ("read_timeout = 0", "read_timeout must be > 0"),
        ("retry_deadline = nan", "retry_deadline must be > 0"),
        ("max_attempts = 0", "max_attempts must be >= 1"),
        ("max_pool_connections = -3", "max_pool_connections must be >= 1"),
    ],
)
def test_invalid_values(tmp_path: Path, line: str, needle: str) -> None:
    config = _write(tmp_path, f"[profiles.x]\n{line}\n")
    with pytest.raises(ConfigError, match=needle) as info:
        Config.load(config, env={}).profile("x")
    assert "'x'" in str(info.value)  # names the profile


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[profiles.x\nendpoint = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        Config.load(path, env={})
    assert str(path) in str(info.value)


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[profiles.x]\nregion = "r\xe9gion"\n')
    with pytest.raises(ConfigError) as info:
        Config.load(path, env={})
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="not found") as info:
        Config.load(path, env={})
    assert str(path) in str(info.value)


def test_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Config.load(tmp_path, env={})


def test_objstore_config_env_is_used_without_a_path(tmp_path: Path) -> None:
    path = _write(tmp_path, TWO_PROFILES)
    config = Config.load(env={"OBJSTORE_CONFIG": str(path)})
    assert config.path == path
    assert config.profile("region-b").max_pool_connections == 32
    # An explicit path wins over the variable.
    other = _write(tmp_path, '[profiles.only]\nregion = "r"\n', "other.toml")
    assert set(Config.load(other, env={"OBJSTORE_CONFIG": str(path)}).profiles) == {"only"}
    # A missing file named by the variable is an error too.
    with pytest.raises(ConfigError, match="not found"):
        Config.load(env={"OBJSTORE_CONFIG": str(tmp_path / "missing.toml")})


def test_no_file_no_profiles() -> None:
    config = Config.load(env={"OBJSTORE_CONFIG": ""})
    assert config.path is None
    assert config.profiles == {}


def test_load_default_env_is_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, TWO_PROFILES)
    monkeypatch.setenv("OBJSTORE_CONFIG", str(path))
    monkeypatch.setenv("AWS_REGION", "from-os-environ")
    config = Config.load()
    assert config.path == path
    assert config.profile(None, "s3").region == "from-os-environ"


def test_unknown_profile_lists_defined_profiles(tmp_path: Path) -> None:
    path = _write(tmp_path, TWO_PROFILES)
    with pytest.raises(ConfigError) as info:
        Config.load(path, env={}).profile("region-c", "s3")
    message = str(info.value)
    assert "'region-c'" in message
    assert "region-a, region-b" in message
    assert str(path) in message


def test_unknown_profile_without_file_says_how_to_add_one() -> None:
    with pytest.raises(ConfigError) as info:
        Config.load(env={}).profile("x")
    assert "OBJSTORE_CONFIG" in str(info.value)
    assert "none" in str(info.value)


def test_default_profile_exists_without_a_file() -> None:
    config = Config.load(env={})
    for name in (None, "", "default"):
        profile = config.profile(name, "s3")
        assert profile == Profile()
        assert profile.name == "default"


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIA-ENV",
    "AWS_SECRET_ACCESS_KEY": "aws-env-secret",
    "AWS_SESSION_TOKEN": "aws-env-token",
    "AWS_REGION": "eu-west-1",
    "AWS_DEFAULT_REGION": "us-west-2",
    "AWS_ENDPOINT_URL": "http://aws-generic:1",
    "AWS_ENDPOINT_URL_S3": "http://aws-s3:1",
}
OSS_ENV = {
    "OSS_ACCESS_KEY_ID": "LTAI-ENV",
    "OSS_ACCESS_KEY_SECRET": "oss-env-secret",
    "OSS_SESSION_TOKEN": "oss-env-token",
    "OSS_REGION": "cn-shanghai",
    "OSS_ENDPOINT": "http://oss-env:1",
}


def test_aws_env_overrides_default_profile_for_s3_only() -> None:
    config = Config.from_mapping(
        {"profiles": {"default": {"region": "file-region", "max_attempts": 2}, "named": {}}},
        env={**AWS_ENV, **OSS_ENV},
    )
    s3 = config.profile(None, "s3")
    assert s3.access_key_id == "AKIA-ENV"
    assert s3.secret_access_key.reveal() == "aws-env-secret"
    assert s3.session_token.reveal() == "aws-env-token"
    assert s3.region == "eu-west-1"  # AWS_REGION before AWS_DEFAULT_REGION, and before the file
    assert s3.endpoint == "http://aws-s3:1"  # the S3-specific variable wins
    assert s3.max_attempts == 2  # untouched file values stay

    oss = config.profile("default", "oss")
    assert oss.access_key_id == "LTAI-ENV"
    assert oss.secret_access_key.reveal() == "oss-env-secret"
    assert oss.session_token.reveal() == "oss-env-token"
    assert oss.region == "cn-shanghai"
    assert oss.endpoint == "http://oss-env:1"

    # Named profiles and other schemes take nothing from the environment.
    assert config.profile("named", "s3") == Profile(name="named")
    assert config.profile("named", "oss") == Profile(name="named")
    plain = config.profile(None, "memory")
    assert plain.access_key_id == "" and plain.region == "file-region"


def test_aws_env_does_not_reach_oss_and_vice_versa() -> None:
    only_aws = Config.from_mapping({}, env=AWS_ENV)
    assert only_aws.profile(None, "oss") == Profile()
    assert only_aws.profile(None, "s3").access_key_id == "AKIA-ENV"
    only_oss = Config.from_mapping({}, env=OSS_ENV)
    assert only_oss.profile(None, "s3") == Profile()
    assert only_oss.profile(None, "oss").access_key_id == "LTAI-ENV"


def test_env_fallbacks() -> None:
    config = Config.from_mapping(
        {},
        env={
            "AWS_REGION": "",  # empty counts as unset
            "AWS_DEFAULT_REGION": "us-west-2",
            "AWS_ENDPOINT_URL": "http://aws-generic:1",
            "ALIBABA_CLOUD_ACCESS_KEY_ID": "LTAI-ALI",
        },
    )
    s3 = config.profile(None, "s3")
    assert s3.region == "us-west-2"
    assert s3.endpoint == "http://aws-generic:1"
    assert config.profile(None, "oss").access_key_id == "LTAI-ALI"


def test_open_store_uses_env_for_default_profile() -> None:
    config = Config.from_mapping({}, env={"AWS_ENDPOINT_URL_S3": CLOSED, "AWS_REGION": "eu-west-1"})
    store = open_store("s3://bucket-x/", config)
    assert isinstance(store, S3Store)
    assert store.client.meta.endpoint_url == CLOSED
    assert store.client.meta.region_name == "eu-west-1"


# -- secrets --------------------------------------------------------------------------------


def test_secret_hides_itself() -> None:
    secret = Secret(SECRET)
    assert secret.reveal() == SECRET
    as_logged = "%s %r" % (secret, secret)  # noqa: UP031 - how log records format arguments
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}", as_logged):
        assert SECRET not in text
        assert "***" in text
    assert secret == Secret(SECRET)
    assert secret != Secret("other")
    assert secret != SECRET  # never equal to the bare string
    assert bool(secret) and not Secret("")


def test_profile_repr_and_str_hide_secrets() -> None:
    config = Config.from_mapping(
        {
            "profiles": {
                "p": {"secret_access_key": SECRET, "session_token": SECRET + "-token"},
            }
        },
        env={"AWS_SECRET_ACCESS_KEY": SECRET + "-env"},
    )
    profile = config.profile("p")
    assert profile.secret_access_key.reveal() == SECRET
    assert profile.session_token.reveal() == SECRET + "-token"
    default = config.profile(None, "s3")
    assert default.secret_access_key.reveal() == SECRET + "-env"
    for text in (repr(profile), str(profile), repr(default), str(default), repr(config)):
        assert SECRET not in text


@pytest.mark.parametrize(
    "extra",
    [
        'bogus_key = "x"',
        'max_attempts = "many"',
        "endpoint = 1",
        'addressing_style = "x"',
        "connect_timeout = -1",
        'secret_access_key = "duplicate"',  # invalid TOML: key defined twice
        f"[profile.typo]\nsecret_access_key = {SECRET!r}",
    ],
)
def test_config_errors_never_show_the_secret(tmp_path: Path, extra: str) -> None:
    path = _write(tmp_path, f"[profiles.p]\nsecret_access_key = {SECRET!r}\n{extra}\n")
    with pytest.raises(ConfigError) as info:
        Config.load(path, env={}).profile("p")
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)


def test_config_errors_never_show_secret_of_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Config.load(_write(tmp_path, "[profiles.p]\nsecret_access_key = 98765432123\n"), env={})
    assert "98765432123" not in str(info.value)


def test_unterminated_secret_is_not_echoed(tmp_path: Path) -> None:
    path = _write(tmp_path, f'[profiles.p]\nsecret_access_key = "{SECRET}\n')
    with pytest.raises(ConfigError) as info:
        Config.load(path, env={})
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(("scheme", "cls"), [("s3", S3Store), ("oss", OSSStore)])
def test_store_repr_and_failing_request_logs_hide_the_secret(
    scheme: str, cls: type, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # root: every logger, SDKs included
    config = _remote_config(CLOSED, connect_timeout=1, max_attempts=1, session_token=TOKEN)
    store = open_store(f"{scheme}://p@bucket-x/pre/", config)
    assert isinstance(store, cls)
    assert SECRET not in repr(store)
    assert SECRET not in str(store)
    with pytest.raises(StorageError) as info:
        store.stat("some/key")
    assert SECRET not in str(info.value)
    assert "127.0.0.1:9" in str(info.value)  # the failure did go to the closed endpoint

    assert caplog.records, "expected DEBUG records from the SDK while opening and requesting"
    sdk = "botocore" if scheme == "s3" else "oss2"
    assert any(r.name.startswith(sdk) for r in caplog.records)
    for secret in (SECRET, TOKEN):  # the SDKs log request headers (the token) at DEBUG
        assert secret not in caplog.text
        for record in caplog.records:
            assert secret not in record.getMessage()
            assert secret not in repr(record.args)


def test_other_components_sections_are_allowed_when_declared(tmp_path: Path) -> None:
    path = _write(tmp_path, "[worker]\nnode_id = 'n1'\n[profiles.p]\nendpoint = 'http://x'\n")
    with pytest.raises(ConfigError, match="unknown top-level key 'worker'"):
        Config.load(path, env={})
    config = Config.load(path, env={}, sections=["worker"])
    assert config.profile("p").endpoint == "http://x"


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-22T10:44:35.000Z",
        "2026-11-22T10:44:35Z",
        "Sun, 22 Nov 2026 10:44:35 GMT",
        "1795344275",
    ],
)
def test_fast_timestamp_parser_agrees_with_botocore(text: str) -> None:
    import botocore.parsers

    from objstore.s3 import fast_timestamp

    assert fast_timestamp(text) == botocore.parsers.DEFAULT_TIMESTAMP_PARSER(text)


def test_profile_keys_from_objstore_profile_variables() -> None:
    """OBJSTORE_PROFILE_<NAME>_<KEY> sets any profile's key (credentials from a Kubernetes
    Secret or an EnvironmentFile while the file holds the endpoints), over the file."""
    env = {
        "OBJSTORE_PROFILE_REGION_B_ACCESS_KEY_ID": "AKIA-B",
        "OBJSTORE_PROFILE_REGION_B_SECRET_ACCESS_KEY": "secret-b",
        "OBJSTORE_PROFILE_REGION_B_MAX_ATTEMPTS": "4",
        "OBJSTORE_PROFILE_ONLY_ENV_ENDPOINT": "http://10.0.0.9:9000",
        **AWS_ENV,
    }
    config = Config.from_mapping(
        {"profiles": {"region-b": {"endpoint": "http://b:1", "access_key_id": "file-key"}}},
        env=env,
    )
    b = config.profile("region-b", "s3")
    assert (b.endpoint, b.access_key_id, b.max_attempts) == ("http://b:1", "AKIA-B", 4)
    assert b.secret_access_key.reveal() == "secret-b" and "secret-b" not in repr(b)
    assert config.profile("only-env", "s3").endpoint == "http://10.0.0.9:9000"
    with pytest.raises(ConfigError, match=r"\$OBJSTORE_PROFILE_REGION_B_MAX_ATTEMPTS.*number"):
        Config.from_mapping(
            {"profiles": {"region-b": {}}},
            env={"OBJSTORE_PROFILE_REGION_B_MAX_ATTEMPTS": "many"},
        ).profile("region-b", "s3")
    with pytest.raises(ConfigError, match="unknown profile 'region-c'"):
        config.profile("region-c", "s3")
