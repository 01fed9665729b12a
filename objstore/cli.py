"""What every command line of the project shares: common options, logging, the exit-code map.

Each CLI (``pcache``, ``babel-sync``, ``ckpt``) builds its own argparse tree, adds the common
options with :func:`add_common_options`, and runs its handler through :func:`run`, the one place
where exceptions become a single ``prog: error: ...`` line and an exit code. A traceback is
shown only with ``--debug``.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from .config import Config
from .errors import (
    AccessDenied,
    BucketNotFound,
    ConfigError,
    EndpointUnreachable,
    InvalidKey,
    ObjectNotFound,
    StorageError,
    UploadNotFound,
)

log = logging.getLogger(__name__)


class ExitCode(enum.IntEnum):
    """Exit codes shared by all CLIs; scripts may rely on them."""

    OK = 0
    FAILED = 1  # the command ran but some work failed (e.g. some objects did not copy)
    USAGE = 2  # bad arguments, URL or configuration
    NOT_FOUND = 3  # bucket, object or path does not exist
    ACCESS = 4  # wrong credentials or permission denied
    UNREACHABLE = 5  # endpoint unreachable or timing out
    VERIFY = 6  # data was moved but verification found a mismatch
    INTERRUPTED = 130


class CommandError(Exception):
    """Raised by a command handler to fail with a message and a specific exit code."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILED) -> None:
        super().__init__(message)
        self.code = code


_EXIT_BY_ERROR: tuple[tuple[type[BaseException], ExitCode], ...] = (
    (ConfigError, ExitCode.USAGE),
    (InvalidKey, ExitCode.USAGE),
    (BucketNotFound, ExitCode.NOT_FOUND),
    (ObjectNotFound, ExitCode.NOT_FOUND),
    (UploadNotFound, ExitCode.NOT_FOUND),
    (AccessDenied, ExitCode.ACCESS),
    (EndpointUnreachable, ExitCode.UNREACHABLE),
    (StorageError, ExitCode.FAILED),
)


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code for an exception that ended a command."""
    if isinstance(exc, CommandError):
        return exc.code
    for cls, code in _EXIT_BY_ERROR:
        if isinstance(exc, cls):
            return code
    return ExitCode.FAILED


def add_common_options(parser: argparse.ArgumentParser, *, subcommand: bool = False) -> None:
    """``--config``, ``-v``, ``--debug``: accepted by every command of every CLI.

    Add them to the top-level parser and (with ``subcommand=True``) to each subcommand, so they
    work before or after the command name; a subcommand's copy has no defaults of its own, so it
    never overwrites a value given before the command name.
    """
    unset: dict[str, Any] = {"default": argparse.SUPPRESS} if subcommand else {}
    group = parser.add_argument_group("common options")
    group.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file with [profiles.NAME] endpoint/credential tables (default: $OBJSTORE_CONFIG)",
        **unset,
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        help="more log output (-vv: debug)",
        **(unset or {"default": 0}),
    )
    group.add_argument("--debug", action="store_true", help="show tracebacks on errors", **unset)


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_size(text: str) -> int:
    """``"64M"``, ``"1.5GiB"``, ``"10MB"`` or ``"4096"`` as bytes (K/M/G alone are binary).

    Raises:
        argparse.ArgumentTypeError: with a message argparse prints as a usage error.
    """
    import re

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*(?:/s)?\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"not a size: {text!r} (examples: 4096, 64M, 1.5GiB, 10MB)"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: sizes as people read them in progress lines and tables."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class JsonFormatter(logging.Formatter):
    """One JSON object per log line (for services whose logs a collector parses): time, level,
    logger, message, and any ``extra`` fields the call gave."""

    _PLAIN = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._PLAIN:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)

    converter = time.gmtime  # type: ignore[assignment]


def use_json_logs() -> None:
    """Switch every root handler to :class:`JsonFormatter`."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonFormatter())


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * min(verbosity, 2)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # SDK debug logs print request headers, which carry signatures and tokens: keep them quiet.
    for noisy in ("botocore", "boto3", "urllib3", "oss2", "s3transfer", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def load_config(args: argparse.Namespace, sections: Sequence[str] = ()) -> Config:
    """The profiles of ``--config`` (or ``$OBJSTORE_CONFIG``); ``sections`` are other tables
    the command's file may hold (``babel-sync``'s ``[service]``)."""
    return Config.load(getattr(args, "config", None), sections=sections)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True, default=str) + "\n")


def run(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    *,
    default: Callable[[argparse.Namespace], int | None] | None = None,
) -> int:
    """Parse ``argv``, run the chosen handler (``args.func``), map any error to an exit code."""
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", 0))
    handler = getattr(args, "func", None) or default
    if handler is None:
        parser.print_help()
        return ExitCode.OK
    try:
        result = handler(args)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:  # `... | head`: not an error
        return ExitCode.OK
    except (CommandError, ConfigError, OSError) as exc:
        if getattr(args, "debug", False):
            log.exception("command failed")
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except Exception as exc:  # a bug: still one line, the traceback on request
        if getattr(args, "debug", False):
            log.exception("command failed")
        print(
            f"{parser.prog}: internal error: {type(exc).__name__}: {exc} (--debug shows more)",
            file=sys.stderr,
        )
        return ExitCode.FAILED
    return int(result or 0)
