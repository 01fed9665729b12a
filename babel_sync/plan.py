"""The plan: a streaming merge-join of the sorted source and destination manifests.

For each key it decides copy, skip, check or delete with the compare ladder of DESIGN.md:

1. size: different sizes -> copy.
2. checksums: a native CRC both services report with the same algorithm; else the CRC we
   stored in the destination's metadata (``babel-crc64nvme``) against the source's CRC.
3. mtime: the destination written after the source was last modified -> skip.

Listings carry size, mtime and ETag, not CRCs, so step 2 needs a HEAD of each side; the plan
marks such keys ``check`` and a transfer worker resolves them (:func:`resolve_check`). Two plain
MD5 ETags (single-part uploads on S3 and OSS) are compared from the listing directly; multipart
ETags are never compared across providers, since each provider builds them differently.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from objstore import ObjectInfo

log = logging.getLogger(__name__)

CRC_METADATA = "babel-crc64nvme"
_PLAIN_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")


class Action(enum.Enum):
    COPY = "copy"
    CHECK = "check"
    SKIP = "skip"
    DELETE = "delete"


@dataclass(frozen=True)
class PlanItem:
    action: Action
    key: str
    src: ObjectInfo | None
    dst: ObjectInfo | None
    reason: str

    def to_json(self) -> dict[str, object]:
        size = self.src.size if self.src else (self.dst.size if self.dst else 0)
        return {"action": self.action.value, "key": self.key, "size": size, "reason": self.reason}


def compare_listed(src: ObjectInfo, dst: ObjectInfo, mode: str) -> tuple[Action, str]:
    """What the listings alone say about a key present on both sides."""
    if src.size != dst.size:
        return Action.COPY, "size differs"
    if mode == "size":
        return Action.SKIP, "same size"
    if _PLAIN_MD5.match(src.etag) and _PLAIN_MD5.match(dst.etag):
        if src.etag.lower() == dst.etag.lower():
            return Action.SKIP, "same MD5 ETag"
        return Action.COPY, "MD5 ETag differs"
    return Action.CHECK, "same size, needs checksum"


def plan(
    src: Iterable[ObjectInfo],
    dst: Iterable[ObjectInfo],
    *,
    delete: bool = False,
    mode: str = "checksum",
) -> Iterator[PlanItem]:
    """Merge-join two key-ordered streams into plan items (bounded memory)."""
    src_it, dst_it = iter(src), iter(dst)
    s, d = next(src_it, None), next(dst_it, None)
    while s is not None or d is not None:
        if d is None or (s is not None and s.key.encode() < d.key.encode()):
            assert s is not None
            yield PlanItem(Action.COPY, s.key, s, None, "missing at destination")
            s = next(src_it, None)
        elif s is None or d.key.encode() < s.key.encode():
            if delete:
                yield PlanItem(Action.DELETE, d.key, None, d, "not at source")
            d = next(dst_it, None)
        else:
            action, reason = compare_listed(s, d, mode)
            yield PlanItem(action, s.key, s, d, reason)
            s, d = next(src_it, None), next(dst_it, None)


def _stored_crc(info: ObjectInfo) -> int | None:
    if info.checksum is not None and info.checksum.algorithm == "crc64nvme":
        return info.checksum.value
    value = info.metadata.get(CRC_METADATA)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def resolve_check(src: ObjectInfo, dst: ObjectInfo) -> tuple[bool, str]:
    """The ladder's steps 2 and 3 on stat results: (needs copy, reason)."""
    if src.size != dst.size:
        return True, "size differs"
    if (
        src.checksum is not None
        and dst.checksum is not None
        and src.checksum.algorithm == dst.checksum.algorithm
    ):
        same = src.checksum.value == dst.checksum.value
        return (not same), f"native {src.checksum.algorithm} {'matches' if same else 'differs'}"
    src_crc, dst_crc = _stored_crc(src), _stored_crc(dst)
    if src_crc is not None and dst_crc is not None:
        same = src_crc == dst_crc
        return (not same), f"crc64nvme {'matches' if same else 'differs'}"
    if dst.mtime >= src.mtime:
        return False, "destination newer than source"
    return True, "source modified after destination"
