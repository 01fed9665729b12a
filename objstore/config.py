"""Named endpoint profiles: where a store lives and which credentials open it.

One command often names two endpoints (``babel-sync sync s3://a@bkt oss://b@bkt``), so endpoints
and credentials are grouped in named profiles, read from a TOML file::

    [profiles.region-a]
    endpoint = "http://127.0.0.1:9000"
    region = "us-east-1"
    access_key_id = "AKIA..."
    secret_access_key = "..."

The file comes from ``--config`` or ``$OBJSTORE_CONFIG``. The standard AWS variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``,
``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``) and OSS variables (``OSS_ACCESS_KEY_ID``,
``OSS_ACCESS_KEY_SECRET``, ``OSS_SESSION_TOKEN``, ``OSS_ENDPOINT``, ``OSS_REGION``) override the
``default`` profile for ``s3://`` and ``oss://`` URLs respectively. Any profile's key can also
come from ``OBJSTORE_PROFILE_<NAME>_<KEY>`` (the name upper-cased, ``-`` and ``.`` as ``_``:
``OBJSTORE_PROFILE_REGION_B_SECRET_ACCESS_KEY``), as rclone's ``RCLONE_CONFIG_<REMOTE>_<KEY>``
do; these win over the file, so a Kubernetes Secret or a systemd EnvironmentFile can hold the
credentials while the file holds the rest. Unknown keys are rejected; secrets are
:class:`Secret` values whose ``repr`` never shows them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import redact
from .errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_ENV = "OBJSTORE_CONFIG"
DEFAULT_PROFILE = "default"


class Secret:
    """A credential string that never shows itself in ``repr``, ``str`` or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself; call only where it is handed to an SDK.

        Revealing registers the value with :mod:`objstore.redact`, so it is scrubbed from every
        log record from then on, the SDKs' debug logs included.
        """
        redact.register(self._value)
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__


@dataclass(frozen=True)
class Profile:
    """Endpoint, credentials and client tuning for one named profile.

    Attributes:
        name: the profile's name (``default`` when a URL names none).
        endpoint: service URL (``http://host:port``); empty means the provider's default.
        region: signing region (S3) or region id (OSS).
        access_key_id: the public half of the credentials.
        secret_access_key: the secret half.
        session_token: STS token, if any.
        addressing_style: S3 ``path``, ``virtual`` or ``auto`` (path is the safe choice for
            custom endpoints).
        connect_timeout: seconds to wait for a TCP connection.
        read_timeout: seconds to wait for response bytes.
        max_pool_connections: HTTP connections kept per client; SDK defaults (10) starve
            parallel transfers.
        max_attempts: attempts per request, including the first.
        retry_deadline: seconds after which a request stops being retried.
        storage_options: extra keyword arguments for fsspec filesystems.
        directory_markers: the endpoint stores zero-byte ``dir/`` keys as objects (every real
            S3 and OSS does), so mounts persist empty directories as such markers. Off for
            servers that turn them into files (``rclone serve s3`` over a local directory).
    """

    name: str = DEFAULT_PROFILE
    endpoint: str = ""
    region: str = ""
    access_key_id: str = ""
    secret_access_key: Secret = field(default_factory=lambda: Secret(""))
    session_token: Secret = field(default_factory=lambda: Secret(""))
    addressing_style: str = "path"
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_pool_connections: int = 128
    max_attempts: int = 10
    retry_deadline: float = 60.0
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)  # may hold keys
    directory_markers: bool = True

    def __post_init__(self) -> None:
        if self.addressing_style not in ("path", "virtual", "auto"):
            raise ConfigError(
                f"profile {self.name!r}: addressing_style must be path, virtual or auto, "
                f"not {self.addressing_style!r}"
            )
        for name in ("connect_timeout", "read_timeout", "retry_deadline"):
            if not getattr(self, name) > 0:  # also rejects NaN
                raise ConfigError(f"profile {self.name!r}: {name} must be > 0")
        for name in ("max_pool_connections", "max_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"profile {self.name!r}: {name} must be >= 1")


_FIELDS = {f.name: f for f in dataclasses.fields(Profile) if f.name != "name"}
_SECRET_FIELDS = {"secret_access_key", "session_token"}

# Standard SDK variables that fill the default profile, per URL scheme; first one set wins.
_ENV_OVERRIDES: dict[str, dict[str, tuple[str, ...]]] = {
    "s3": {
        "access_key_id": ("AWS_ACCESS_KEY_ID",),
        "secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
        "session_token": ("AWS_SESSION_TOKEN",),
        "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
        "endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    },
    "oss": {
        "access_key_id": ("OSS_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_ID"),
        "secret_access_key": ("OSS_ACCESS_KEY_SECRET", "ALIBABA_CLOUD_ACCESS_KEY_SECRET"),
        "session_token": ("OSS_SESSION_TOKEN", "ALIBABA_CLOUD_SECURITY_TOKEN"),
        "region": ("OSS_REGION",),
        "endpoint": ("OSS_ENDPOINT",),
    },
}


def profile_env_prefix(name: str) -> str:
    """``region-b`` -> ``OBJSTORE_PROFILE_REGION_B_``: the variables that set its keys."""
    return "OBJSTORE_PROFILE_" + name.upper().replace("-", "_").replace(".", "_") + "_"


def _coerce(profile: str, key: str, value: Any, source: str) -> Any:
    """Check one profile value against its dataclass field type."""
    if key not in _FIELDS:
        valid = ", ".join(sorted(_FIELDS))
        raise ConfigError(f"{source}: profile {profile!r}: unknown key {key!r} (valid: {valid})")
    default = _FIELDS[key].default
    if key in _SECRET_FIELDS:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: profile {profile!r}: {key} must be a string")
        return Secret(value)
    if key == "storage_options":
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: profile {profile!r}: storage_options must be a table")
        return dict(value)
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            value = value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: profile {profile!r}: {key} must be true or false")
        return value
    if isinstance(default, str):
        if not isinstance(value, type(default)):
            raise ConfigError(f"{source}: profile {profile!r}: {key} must be a string")
        return value
    if isinstance(default, int | float):
        if isinstance(value, str):
            try:
                value = float(value) if isinstance(default, float) else int(value)
            except ValueError:
                raise ConfigError(
                    f"{source}: profile {profile!r}: {key} must be a number, not {value!r}"
                ) from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: profile {profile!r}: {key} must be a number")
        if isinstance(default, int) and isinstance(value, float) and not value.is_integer():
            # int() would silently truncate 2.5 to 2
            raise ConfigError(f"{source}: profile {profile!r}: {key} must be a whole number")
        return type(default)(value)
    return value


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A TOML config file, parsed; every way it can be unreadable is one clear ConfigError."""
    file = Path(path).expanduser()
    try:
        return tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {file}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {file} is not valid UTF-8") from None


@dataclass(frozen=True)
class Config:
    """All profiles known to a process, as loaded from a file plus the environment.

    Attributes:
        path: the TOML file the profiles came from, if any.
        profiles: raw per-profile tables (already validated), by name.
        env: the environment consulted for overrides (``os.environ`` unless given).
    """

    path: Path | None = None
    profiles: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ), repr=False)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        *,
        sections: Collection[str] = (),
    ) -> Config:
        """Load profiles from ``path``, else ``$OBJSTORE_CONFIG``, else none.

        ``sections`` names other top-level tables the caller reads from the same file.

        Raises:
            ConfigError: the file is missing, not valid TOML, or has unknown keys.
        """
        env = dict(os.environ if env is None else env)
        chosen = path if path is not None else env.get(CONFIG_ENV) or None
        if chosen is None:
            return cls(None, {}, env)
        file = Path(chosen).expanduser()
        data = read_toml(file)
        return cls.from_mapping(data, source=str(file), env=env, path=file, sections=sections)

    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, Any],
        *,
        source: str = "<config>",
        env: Mapping[str, str] | None = None,
        path: Path | None = None,
        sections: Collection[str] = (),
    ) -> Config:
        """Validate a parsed TOML document (``[profiles.NAME]`` tables).

        Args:
            sections: other top-level tables the caller reads itself (e.g. ``worker``); any
                other unknown key is an error, so a ``[profile.x]`` typo is not silently ignored.
        """
        env = dict(os.environ if env is None else env)
        allowed = {"profiles", *sections}
        unknown = sorted(set(data) - allowed)
        if unknown:
            valid = ", ".join(sorted(allowed))
            raise ConfigError(f"{source}: unknown top-level key {unknown[0]!r} (valid: {valid})")
        profiles_raw = data.get("profiles", {})
        if not isinstance(profiles_raw, Mapping):
            raise ConfigError(f"{source}: [profiles] must be a table of tables")
        profiles: dict[str, dict[str, Any]] = {}
        for name, table in profiles_raw.items():
            if not isinstance(table, Mapping):
                raise ConfigError(f"{source}: [profiles.{name}] must be a table")
            profiles[name] = {k: _coerce(name, k, v, source) for k, v in table.items()}
        return cls(path, profiles, env)

    def profile(self, name: str | None, scheme: str = "") -> Profile:
        """The resolved profile ``name`` for URLs of ``scheme``.

        ``default`` always exists (possibly empty) and takes the SDK environment variables of
        ``scheme``; any other name must be in the config file.

        Raises:
            ConfigError: the profile is not defined.
        """
        name = name or DEFAULT_PROFILE
        from_env = self._profile_env(name)
        if name not in self.profiles and name != DEFAULT_PROFILE and not from_env:
            where = (
                f"in {self.path}"
                if self.path
                else f"(no config file: use --config or ${CONFIG_ENV})"
            )
            known = ", ".join(sorted(self.profiles)) or "none"
            raise ConfigError(f"unknown profile {name!r} {where}; defined profiles: {known}")
        values: dict[str, Any] = dict(self.profiles.get(name, {}))
        if name == DEFAULT_PROFILE:
            for key, variables in _ENV_OVERRIDES.get(scheme, {}).items():
                for var in variables:
                    if self.env.get(var):
                        values[key] = _coerce(name, key, self.env[var], f"${var}")
                        break
        for key, (var, value) in from_env.items():
            values[key] = _coerce(name, key, value, f"${var}")
        return Profile(name=name, **values)

    def _profile_env(self, name: str) -> dict[str, tuple[str, str]]:
        """The ``OBJSTORE_PROFILE_<NAME>_<KEY>`` variables set for profile ``name``."""
        prefix = profile_env_prefix(name)
        found = {}
        for key in _FIELDS:
            if key == "storage_options":
                continue  # a table; the file only
            var = prefix + key.upper()
            if self.env.get(var):
                found[key] = (var, self.env[var])
        return found
