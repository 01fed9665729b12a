"""Small helpers shared by the simulators in bench/sim: Zipf popularity, percentiles, plain-text
tables and JSON results. Pure standard library; nothing here knows about a particular simulator."""

from __future__ import annotations

import bisect
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def zipf_cum_weights(n: int, s: float) -> list[float]:
    """Cumulative weights of a Zipf law over ranks 1..n: rank ``r`` has weight ``r ** -s``.

    Feed them to ``random.Random.choices(cum_weights=...)`` or to :class:`ZipfSampler`; the last
    element is the normalising constant (the generalised harmonic number ``H(n, s)``).
    """
    if n < 1:
        raise ValueError(f"need at least one rank, got {n}")
    cum: list[float] = []
    total = 0.0
    for rank in range(1, n + 1):
        total += rank**-s
        cum.append(total)
    return cum


class ZipfSampler:
    """Draw ranks 0..n-1 (0 the most popular) with Zipf(s) probabilities from a seeded RNG."""

    def __init__(self, n: int, s: float) -> None:
        self.n = n
        self.s = s
        self.cum = zipf_cum_weights(n, s)
        self.total = self.cum[-1]

    def probability(self, rank: int) -> float:
        """Probability of rank ``rank`` (0-based)."""
        return (rank + 1) ** -self.s / self.total

    def sample(self, rng: random.Random, k: int) -> list[int]:
        """``k`` independent draws."""
        cum, total, hi = self.cum, self.total, self.n - 1
        draw, find = rng.random, bisect.bisect_right
        return [find(cum, draw() * total, 0, hi) for _ in range(k)]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, nearest rank; NaN when empty."""
    if not sorted_values:
        return math.nan
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: columns padded to their widest cell, first column left-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (NaN and infinities as null), creating parent folders."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_finite(data), indent=2, sort_keys=False) + "\n")
    return out


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
