"""Keeping credentials out of logs, including the SDKs' own debug logs.

Every secret handed to an SDK goes through :meth:`objstore.config.Secret.reveal`, which registers
it here. A log-record factory then replaces any registered value in a record's message with
``***`` before any handler sees it: botocore and oss2 print request headers (session tokens
among them) at DEBUG level, and a user who turns on debug logging must not leak them.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

_MIN_LENGTH = 6  # shorter values would blank out unrelated text
_secrets: set[str] = set()
_lock = threading.Lock()
_installed = False


def register(value: str) -> None:
    """Redact ``value`` from every log record created from now on."""
    global _installed
    if len(value) < _MIN_LENGTH or value in _secrets:
        return
    with _lock:
        _secrets.add(value)
        if not _installed:
            _install()
            _installed = True


def scrub(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    for secret in tuple(_secrets):
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _install() -> None:
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's problem, not ours
            return record
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        return record

    logging.setLogRecordFactory(factory)
