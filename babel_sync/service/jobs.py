"""Sync jobs as the service keeps them: their specification, state and results, in LMDB.

A job is submitted as JSON (the CLI's options, by their CLI names), validated here field by
field (:class:`BadRequest` names the field), and stored under its id with its state. States:
``queued`` -> ``running`` -> ``succeeded`` | ``failed`` | ``verify_failed``; ``paused`` and
``cancelled`` by request; ``scheduled`` while a ``daily_at`` job waits for its first run. A job
with a schedule (``every_minutes`` after each start, or ``daily_at`` a UTC time) runs again when
due, never while its previous run is still going. A running job's own progress lives in its journal (the sync engine's),
so a job interrupted by a pause or a restart of the service continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from objstore.url import parse_url

MODES = ("sync", "copy", "check")
VERIFY = ("none", "runtime", "sample", "full")
FINAL = ("succeeded", "failed", "verify_failed", "cancelled")
STATES = ("scheduled", "queued", "running", "paused", *FINAL)
_DAILY = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


def next_daily(at: str, now: float) -> float:
    """The next time (epoch seconds) the UTC clock reads ``HH:MM`` after ``now``."""
    match = _DAILY.match(at)
    if match is None:
        raise ValueError(f"not HH:MM: {at!r}")
    day = now - now % 86400
    when = day + 3600 * int(match.group(1)) + 60 * int(match.group(2))
    return when if when > now else when + 86400


class BadRequest(ValueError):
    """A submitted job or request is malformed; the message names the field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class JobNotFound(KeyError):
    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"no job {self.job_id!r}"


@dataclass(frozen=True)
class JobSpec:
    """What to run: the CLI's ``sync``/``copy``/``check`` with its options."""

    source: str
    destination: str
    mode: str = "sync"
    delete: bool = False
    verify: str = "sample"
    transfers: int = 16
    bwlimit: str | None = None  # as the CLI reads it: "50M" bytes per second
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    every_minutes: float | None = None  # a schedule: run again this long after each start
    daily_at: str | None = None  # a schedule: every day at this UTC time, "HH:MM"
    name: str = ""
    engine: str = "local"  # or "ray": transfers as tasks on a Ray cluster
    ray_address: str | None = None
    part_size: str | None = None  # multipart part size as the CLI reads it ("8MiB"); None: auto

    @classmethod
    def from_json(cls, body: Any) -> JobSpec:
        if not isinstance(body, dict):
            raise BadRequest("body", "expected a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(body) - known)
        if unknown:
            raise BadRequest(unknown[0], "unknown field")
        for name in ("source", "destination"):
            value = body.get(name)
            if not isinstance(value, str) or not value:
                raise BadRequest(name, "required: a store URL")
            try:
                parse_url(value)
            except ValueError as exc:
                raise BadRequest(name, str(exc)) from None
        mode = body.get("mode", "sync")
        if mode not in MODES:
            raise BadRequest("mode", f"one of {', '.join(MODES)}")
        verify = body.get("verify", "sample")
        if verify not in VERIFY:
            raise BadRequest("verify", f"one of {', '.join(VERIFY)}")
        transfers = body.get("transfers", 16)
        if (
            not isinstance(transfers, int)
            or isinstance(transfers, bool)
            or not 1 <= transfers <= 1024
        ):
            raise BadRequest("transfers", "an integer from 1 to 1024")
        delete = body.get("delete", False)
        if not isinstance(delete, bool):
            raise BadRequest("delete", "true or false")
        if delete and mode != "sync":
            raise BadRequest("delete", "only a sync deletes")
        bwlimit = body.get("bwlimit")
        if bwlimit is not None:
            from objstore.cli import parse_size

            try:
                parse_size(str(bwlimit))
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise BadRequest("bwlimit", str(exc)) from None
        every = body.get("every_minutes")
        if every is not None and (not isinstance(every, int | float) or every <= 0):
            raise BadRequest("every_minutes", "a positive number of minutes")
        daily = body.get("daily_at")
        if daily is not None and (not isinstance(daily, str) or not _DAILY.match(daily)):
            raise BadRequest("daily_at", "a UTC time of day, HH:MM")
        if daily is not None and every is not None:
            raise BadRequest("daily_at", "one schedule per job: every_minutes or daily_at")
        rules: dict[str, tuple[str, ...]] = {}
        for name in ("include", "exclude"):
            value = body.get(name, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise BadRequest(name, "a list of glob patterns")
            rules[name] = tuple(value)
        name = body.get("name", "")
        if not isinstance(name, str) or len(name) > 200:
            raise BadRequest("name", "a string of at most 200 characters")
        part_size = body.get("part_size")
        if part_size is not None:
            from objstore.cli import parse_size

            try:
                if parse_size(str(part_size)) < 5 * 1024 * 1024:
                    raise BadRequest("part_size", "at least 5 MiB (the S3 minimum)")
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise BadRequest("part_size", str(exc)) from None
        engine = body.get("engine", "local")
        if engine not in ("local", "ray"):
            raise BadRequest("engine", "local or ray")
        ray_address = body.get("ray_address")
        if ray_address is not None and (not isinstance(ray_address, str) or not ray_address):
            raise BadRequest("ray_address", "HOST:PORT of the Ray cluster, or auto")
        return cls(
            body["source"], body["destination"], mode, delete, verify, transfers,
            None if bwlimit is None else str(bwlimit), rules["include"], rules["exclude"],
            None if every is None else float(every), daily, name, engine, ray_address,
            None if part_size is None else str(part_size),
        )  # fmt: skip

    def cli_args(self) -> list[str]:
        """The ``babel-sync`` arguments that run this job."""
        args = [self.mode, self.source, self.destination, "--verify", self.verify,
                "--transfers", str(self.transfers)]  # fmt: skip
        if self.delete:
            args.append("--delete")
        if self.bwlimit:
            args += ["--bwlimit", self.bwlimit]
        if self.part_size:
            args += ["--part-size", self.part_size]
        for pattern in self.include:
            args += ["--include", pattern]
        for pattern in self.exclude:
            args += ["--exclude", pattern]
        if self.engine == "ray":
            args += ["--engine", "ray"]
            if self.ray_address:
                args += ["--ray-address", self.ray_address]
        return args


@dataclass
class Job:
    id: str
    spec: JobSpec
    state: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    runs: int = 0
    progress: dict[str, Any] = field(default_factory=dict)
    history: list[list[float]] = field(default_factory=list)  # [elapsed s, bytes copied]
    report: dict[str, Any] | None = None
    error: str = ""
    next_run: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["spec"] = asdict(self.spec)
        p = self.progress
        done = p.get("copied_bytes", 0)  # at the destination (server-side copies included)
        rate = done / p["elapsed"] if p.get("elapsed") else 0.0
        left = p.get("to_copy_bytes", 0) - done
        out["rate"] = rate
        out["eta_s"] = left / rate if rate > 0 and left > 0 else None
        out["percent"] = 100.0 * done / p["to_copy_bytes"] if p.get("to_copy_bytes") else None
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Job:
        spec = raw.pop("spec")
        for name in ("include", "exclude"):
            spec[name] = tuple(spec.get(name, ()))
        for derived in ("rate", "eta_s", "percent"):
            raw.pop(derived, None)
        return cls(spec=JobSpec(**spec), **raw)


class JobStore:
    """Jobs in LMDB (``DIR/jobs.lmdb``): survives restarts. Thread-safe."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(str(directory / "jobs.lmdb"), map_size=1 << 30, subdir=True)
        self._lock = threading.Lock()

    def new_id(self) -> str:
        return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]

    def put(self, job: Job) -> None:
        with self._lock, self._env.begin(write=True) as txn:
            txn.put(job.id.encode(), json.dumps(job.to_json()).encode())

    def get(self, job_id: str) -> Job:
        with self._env.begin() as txn:
            raw = txn.get(job_id.encode())
        if raw is None:
            raise JobNotFound(job_id)
        return Job.from_json(json.loads(raw))

    def all(self) -> list[Job]:
        with self._env.begin() as txn:
            return [Job.from_json(json.loads(v)) for _, v in txn.cursor()]

    def delete(self, job_id: str) -> None:
        with self._lock, self._env.begin(write=True) as txn:
            if not txn.delete(job_id.encode()):
                raise JobNotFound(job_id)

    def close(self) -> None:
        self._env.close()
