"""``babel-sync serve`` configuration: a ``[service]`` table in TOML, environment overrides.

```toml
[service]
listen = "127.0.0.1:8470"        # BABEL_SYNC_LISTEN
token = "a long random string"   # BABEL_SYNC_TOKEN (required: every request must carry it)
state_dir = "/var/lib/babel-sync" # jobs (LMDB) and their journals
max_concurrent = 2               # jobs running at once
bwlimit = "200M"                 # bytes/s across running jobs (split at each job's start)
objstore_config = "/etc/babel-sync/objstore.toml"  # store profiles for the jobs
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from objstore.config import Secret, read_toml
from objstore.errors import ConfigError

DEFAULT_LISTEN = "127.0.0.1:8470"
DEFAULT_STATE_DIR = Path("~/.local/state/babel-sync")


@dataclass(frozen=True)
class ServiceConfig:
    """The ``[service]`` table of ``babel-sync serve``.

    Attributes:
        token: every request must carry ``Authorization: Bearer <token>``; 16+ characters.
            ``$BABEL_SYNC_TOKEN`` overrides.
        listen: ``HOST:PORT`` of the API, dashboard and /metrics. ``$BABEL_SYNC_LISTEN`` overrides.
        state_dir: the job database (LMDB) and the jobs' journals.
        max_concurrent: jobs running at once; the others wait in the queue.
        bwlimit: bytes per second across all running jobs (``"200M"``), split evenly at each
            job's start; a job's own bwlimit takes precedence.
        objstore_config: the file holding the jobs' ``[profiles.*]`` (default: this file).
    """

    token: Secret
    listen: str = DEFAULT_LISTEN
    state_dir: Path = DEFAULT_STATE_DIR
    max_concurrent: int = 2
    bwlimit: str | None = None
    objstore_config: str | None = None

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host or "127.0.0.1", int(port)

    @classmethod
    def load(cls, path: str | None, env: dict[str, str] | None = None) -> ServiceConfig:
        """From ``path`` (its ``[service]`` table) and the environment.

        Raises:
            ConfigError: unreadable file, unknown key, bad value, or no token.
        """
        env = dict(os.environ) if env is None else env
        table: dict[str, Any] = {}
        if path:
            raw = read_toml(path)
            table = dict(raw.get("service", {}))
            unknown = set(table) - {"listen", "token", "state_dir", "max_concurrent", "bwlimit",
                                    "objstore_config"}  # fmt: skip
            if unknown:
                raise ConfigError(f"{path}: unknown [service] keys: {', '.join(sorted(unknown))}")
        for key, var in (("token", "BABEL_SYNC_TOKEN"), ("listen", "BABEL_SYNC_LISTEN")):
            if env.get(var):
                table[key] = env[var]
        token = table.pop("token", None)
        if not token or not isinstance(token, str) or len(token) < 16:
            raise ConfigError(
                "the service needs a token of 16+ characters: [service] token or BABEL_SYNC_TOKEN"
            )
        listen = str(table.get("listen", DEFAULT_LISTEN))
        if ":" not in listen or not listen.rpartition(":")[2].isdigit():
            raise ConfigError(f"listen must be HOST:PORT, not {listen!r}")
        concurrent = table.get("max_concurrent", 2)
        if not isinstance(concurrent, int) or concurrent < 1:
            raise ConfigError("max_concurrent must be a positive integer")
        state = Path(str(table.get("state_dir", DEFAULT_STATE_DIR))).expanduser()
        return cls(
            Secret(token), listen, state, concurrent, table.get("bwlimit"),
            table.get("objstore_config"),
        )  # fmt: skip
