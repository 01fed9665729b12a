#!/usr/bin/env python3
"""Generate docs/config-reference.md from the configuration dataclasses.

Every key, its type, its default and its description come from the code (the dataclasses'
fields and the ``Attributes:`` sections of their docstrings), so the reference cannot drift:
``tests/test_docs.py`` fails when the file differs from what this script renders, or when a
field has no description. Regenerate with ``make docs`` (or ``python docs/config_reference.py``).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from babel_sync.service.config import ServiceConfig  # noqa: E402
from ckpt.trainer.model import ModelConfig  # noqa: E402
from ckpt.trainer.train import TrainConfig  # noqa: E402
from objstore.config import Profile, Secret  # noqa: E402
from pcache.config import CacheDirConfig, ClientConfig, PeerConfig, WorkerConfig  # noqa: E402

OUTPUT = ROOT / "docs" / "config-reference.md"

# (heading, where it is used, dataclass, fields left out: not keys of the table)
SECTIONS: list[tuple[str, str, type, set[str]]] = [
    (
        "[profiles.NAME]",
        "Every tool (`babel-sync`, `pcache`, `ckpt`, `objstore`): one table per store endpoint; "
        "a URL names it as `s3://NAME@bucket/prefix`. The file comes from `--config FILE` or "
        "`$OBJSTORE_CONFIG`. The profile `default` (or a URL without a name) also takes the SDK "
        "variables: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, "
        "`AWS_ENDPOINT_URL`, `AWS_REGION` for S3; `OSS_ACCESS_KEY_ID`, "
        "`OSS_ACCESS_KEY_SECRET`, `OSS_SESSION_TOKEN`, `OSS_ENDPOINT`, `OSS_REGION` for OSS "
        "(docs/objstore.md).",
        Profile,
        {"name"},
    ),
    (
        "[pcache]",
        "`pcache worker` (one file per node: `--config FILE` or `$PCACHE_CONFIG`). Environment "
        "overrides: `PCACHE_NODE_ID`, `PCACHE_LISTEN`, `PCACHE_ADVERTISE`, `PCACHE_PEERS_DNS`, "
        "`PCACHE_TOKEN`.",
        WorkerConfig,
        {"profiles"},
    ),
    (
        "[[pcache.cache_dirs]]",
        "One table per cache disk (NVMe) of the worker.",
        CacheDirConfig,
        set(),
    ),
    (
        "pcache.peers",
        "The static peer list: `peers = [{ id = ..., address = ... }]`.",
        PeerConfig,
        set(),
    ),
    (
        "pcache clients",
        "The mount, the fsspec filesystem (`pcache://`) and ckpt's pcache backend. Not a table: "
        "the environment, or the worker's `[pcache]` table for its address and token.",
        ClientConfig,
        set(),
    ),
    (
        "[service]",
        "`babel-sync serve --config FILE` (the same file may hold the jobs' `[profiles.*]`).",
        ServiceConfig,
        set(),
    ),
    (
        "[train]",
        "`ckpt train --config FILE` and `torchrun -m ckpt.trainer --config FILE`.",
        TrainConfig,
        set(),
    ),
    ("[model]", "The same file: the bundled MoE decoder's shape.", ModelConfig, set()),
]


def attribute_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` section of a Google-style docstring: name -> one-line text."""
    doc = inspect.getdoc(cls) or ""
    lines = doc.splitlines()
    try:
        start = lines.index("Attributes:") + 1
    except ValueError:
        return {}
    found: dict[str, str] = {}
    current = None
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break  # the next section
        match = re.match(r"^    (\w+)(?: \([^)]*\))?: (.*)$", line)
        if match:
            current = match.group(1)
            found[current] = match.group(2).strip()
        elif current and line.startswith("        "):
            found[current] += " " + line.strip()
    return found


def default_of(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if isinstance(value, Secret):
        return '`""` (secret)' if not value else "(secret)"
    if isinstance(value, Path):
        return f'`"{value}"`'
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value is None:
        return "unset"
    if isinstance(value, dict | tuple | list) and not value:
        return "empty"
    if dataclasses.is_dataclass(value):
        return "see below"
    if isinstance(value, int) and value >= 1 << 20 and value % (1 << 20) == 0:
        return f"`{value}` ({value >> 20} MiB)"
    return f"`{value!r}`"


def type_of(f: dataclasses.Field[Any]) -> str:
    text = str(f.type)
    text = text.replace("Mapping[str, str]", "table of strings").replace(
        "Secret", "string (secret)"
    )
    text = re.sub(r"tuple\[(\w+), \.\.\.\]", r"list of \1", text)
    text = text.replace("Path", "path").replace("| None", "(optional)")
    return text.replace("Mapping[str, Any]", "table")


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated by `docs/config_reference.py` from the configuration dataclasses; do not edit",
        "by hand (`make docs` regenerates it, and the tests fail when it is out of date).",
        'Unknown keys are refused with one line naming the key. Sizes take `4194304`, `"4MiB"`,',
        '`"800GiB"`. Example files with every option commented: `deploy/pcache/pcache.toml.example`,',
        "`deploy/babel-sync/serve.toml.example`.",
        "",
    ]
    for heading, usage, cls, skip in SECTIONS:
        docs = attribute_docs(cls)
        out += [
            f"## `{heading}`",
            "",
            usage,
            "",
            "| key | type | default | meaning |",
            "| --- | --- | --- | --- |",
        ]
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            text = re.sub(r"``([^`]+)``", r"`\1`", docs.get(f.name, "")).replace("|", "\\|")
            out.append(f"| `{f.name}` | {type_of(f)} | {default_of(f)} | {text} |")
        out.append("")
    return "\n".join(out)


def undocumented() -> list[str]:
    """Fields without a description (the tests require none)."""
    missing = []
    for _heading, _usage, cls, skip in SECTIONS:
        docs = attribute_docs(cls)
        missing += [
            f"{cls.__name__}.{f.name}"
            for f in dataclasses.fields(cls)
            if f.name not in skip and f.name not in docs
        ]
    return missing


def main() -> int:
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    missing = undocumented()
    if missing:
        print("fields without a description: " + ", ".join(missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
