"""Include/exclude filters on keys, with rclone's rule: the first matching rule wins.

Patterns are globs on the key relative to the root (``*`` stops at ``/``, ``**`` crosses it,
``?`` is one character, ``[abc]`` a class; a pattern starting with ``/`` is anchored at the root,
otherwise it may match at any directory level; a pattern ending in ``/`` matches everything
below that directory). When any ``--include`` is given, keys matching no rule are
excluded; with only ``--exclude`` rules they are included.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    anchored = pattern.startswith("/")
    body = pattern.lstrip("/")
    out = []
    i = 0
    while i < len(body):
        c = body[i]
        if body.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = body.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                out.append("[" + body[i + 1 : end].replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    prefix = "^" if anchored else "^(?:.*/)?"
    suffix = ".*$" if body.endswith("/") else "$"  # "dir/" matches everything below dir
    return re.compile(prefix + "".join(out) + suffix)


@dataclass(frozen=True)
class Rule:
    include: bool
    pattern: str
    regex: re.Pattern[str]


class KeyFilter:
    """An ordered list of include/exclude rules."""

    def __init__(self, rules: list[tuple[bool, str]] | None = None) -> None:
        self.rules = [Rule(inc, pat, _glob_to_regex(pat)) for inc, pat in (rules or [])]
        self._default = not any(r.include for r in self.rules)

    @classmethod
    def from_args(cls, include: list[str] | None, exclude: list[str] | None) -> KeyFilter:
        """Excludes first, then includes (the common ``--exclude X --include Y`` intent)."""
        rules = [(False, p) for p in exclude or []] + [(True, p) for p in include or []]
        return cls(rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __call__(self, key: str) -> bool:
        for rule in self.rules:
            if rule.regex.match(key):
                return rule.include
        return self._default

    def describe(self) -> list[str]:
        return [("+ " if r.include else "- ") + r.pattern for r in self.rules]
