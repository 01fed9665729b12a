"""Runs the service's jobs: each as a ``babel-sync`` process, at most N at once.

A job runs as ``python -m babel_sync.cli MODE SRC DST --json --progress-json --journal DIR``:
the engine and its crash-safe journal are the CLI's own, so there is one implementation of a
sync. The runner reads the ``PROGRESS`` lines (phase, counts, bytes, elapsed), keeps a
throughput history, and tells subscribers (the event stream) of every change. Pausing or
cancelling interrupts the process (SIGINT: the journal is kept); resuming queues the job again
and its next run continues from the journal. Jobs found ``running`` when the service starts were
interrupted by its stop, and are queued again.

Call order: construct, ``await start()`` (in the aiohttp app's cleanup context), then
:meth:`submit`/:meth:`pause`/:meth:`resume`/:meth:`cancel`/:meth:`delete` from handlers,
``await stop()`` last. All methods run on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from babel_sync.progress import PROGRESS_PREFIX
from objstore.cli import parse_size

from .jobs import FINAL, BadRequest, Job, JobSpec, JobStore, next_daily

log = logging.getLogger(__name__)

HISTORY_POINTS = 600
STOP_GRACE_S = 10.0


@dataclass
class RunnerOptions:
    state_dir: Path
    max_concurrent: int = 2
    objstore_config: str | None = None  # passed to each job as --config
    bwlimit: str | None = None  # across all running jobs: split evenly at each job's start
    python: str = sys.executable


def _die_with_parent() -> None:
    """In the job's process: be killed when the service dies, so a restarted service never
    finds a job still running on the journal it resumes (the journal survives a kill)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class JobRunner:
    def __init__(self, options: RunnerOptions) -> None:
        self.options = options
        self.store = JobStore(options.state_dir)
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._live: dict[str, Job] = {}  # running jobs: progress changes here, saved now and then
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.totals = {"started": 0, "succeeded": 0, "failed": 0, "cancelled": 0}

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        for job in self.store.all():
            if job.state == "running":  # the service stopped under it: continue from its journal
                job.state = "queued"
                self.store.put(job)
        self._loop_task = asyncio.create_task(self._schedule())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        for job_id in list(self._procs):
            await self._interrupt(job_id)
        for task in list(self._tasks):
            task.cancel()
        self.store.close()

    # -- requests ----------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> Job:
        job = Job(self.store.new_id(), spec)
        if spec.daily_at:
            job.state, job.next_run = "scheduled", next_daily(spec.daily_at, time.time())
        self.store.put(job)
        self._changed(job)
        self._wake.set()
        return job

    def get(self, job_id: str) -> Job:
        return self._live.get(job_id) or self.store.get(job_id)

    def jobs(self) -> list[Job]:
        return [self._live.get(j.id, j) for j in self.store.all()]

    async def pause(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state not in ("scheduled", "queued", "running"):
            raise BadRequest("state", f"a {job.state} job cannot be paused")
        await self._set_final(job, "paused")
        return job

    async def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state in FINAL:
            raise BadRequest("state", f"the job is already {job.state}")
        await self._set_final(job, "cancelled")
        return job

    def resume(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state != "paused":
            raise BadRequest("state", f"only a paused job resumes (this one is {job.state})")
        job.state = "queued"
        self.store.put(job)
        self._changed(job)
        self._wake.set()
        return job

    async def delete(self, job_id: str) -> None:
        job = self.get(job_id)
        if job.state == "running":
            raise BadRequest("state", "cancel the running job first")
        self.store.delete(job_id)
        self._changed(job, deleted=True)

    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def queue_length(self) -> int:
        return sum(1 for j in self.store.all() if j.state == "queued")

    # -- scheduling --------------------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            now = time.time()
            for job in sorted(self.store.all(), key=lambda j: j.created):
                if len(self._procs) >= self.options.max_concurrent:
                    break
                due = job.state == "queued" or (
                    job.state in ("scheduled", "succeeded", "failed", "verify_failed")
                    and job.next_run is not None
                    and job.next_run <= now
                )
                if due and job.id not in self._procs:
                    self._launch(job)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            except TimeoutError:
                pass

    def _launch(self, job: Job) -> None:
        job.state, job.started, job.finished = "running", time.time(), None
        job.runs += 1
        job.error, job.report, job.next_run = "", None, None
        self.store.put(job)
        self._live[job.id] = job
        task = asyncio.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.totals["started"] += 1

    def _command(self, job: Job) -> list[str]:
        journal = self.options.state_dir / "journals" / job.id
        args = [self.options.python, "-m", "babel_sync.cli", *job.spec.cli_args(), "--json",
                "--progress-json", "--stats-interval", "1", "--journal", str(journal)]  # fmt: skip
        if self.options.objstore_config:
            args += ["--config", self.options.objstore_config]
        share = self._bandwidth_share()
        if share is not None and "--bwlimit" not in args:
            args += ["--bwlimit", str(share)]
        return args

    def _bandwidth_share(self) -> int | None:
        if not self.options.bwlimit:
            return None
        return max(1, parse_size(self.options.bwlimit) // max(1, len(self._procs) + 1))

    async def _run(self, job: Job) -> None:
        cmd = self._command(job)
        log.info(
            "job %s started (run %d)", job.id, job.runs, extra={"job": job.id, "event": "start"}
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
        except OSError as exc:  # never a job stuck "running" without a process
            self._live.pop(job.id, None)
            job.state, job.finished, job.error = "failed", time.time(), f"cannot start: {exc}"
            self.totals["failed"] += 1
            self.store.put(job)
            self._changed(job)
            return
        self._procs[job.id] = proc
        errors: list[str] = []
        last_save = 0.0
        assert proc.stderr is not None and proc.stdout is not None
        stdout_task = asyncio.create_task(proc.stdout.read())
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line.startswith(PROGRESS_PREFIX):
                job.progress = json.loads(line[len(PROGRESS_PREFIX) :])
                job.history.append([job.progress["elapsed"], job.progress.get("copied_bytes", 0)])
                del job.history[:-HISTORY_POINTS]
                self._changed(job)
                if time.monotonic() - last_save > 5:
                    self.store.put(job)
                    last_save = time.monotonic()
            elif line:
                errors.append(line)
                del errors[:-20]
        out = await stdout_task
        code = await proc.wait()
        self._procs.pop(job.id, None)
        self._live.pop(job.id, None)
        if job.state in ("paused", "cancelled"):  # asked for: the interrupt is not a failure
            self.store.put(job)
            self._changed(job)
            self._wake.set()
            return
        try:
            job.report = json.loads(out) if out.strip() else None
        except json.JSONDecodeError:
            job.report = None
        job.finished = time.time()
        if code == 0:
            job.state = "succeeded"
        elif code == 6:
            job.state = "verify_failed"
        else:
            job.state = "failed"
            job.error = errors[-1] if errors else f"exit code {code}"
        self.totals["succeeded" if code == 0 else "failed"] += 1
        log.info("job %s %s", job.id, job.state, extra={"job": job.id, "event": job.state,
                 "exit_code": code, "copied": job.progress.get("copied", 0)})  # fmt: skip
        if job.spec.every_minutes and job.started is not None:
            job.next_run = job.started + 60 * job.spec.every_minutes
        elif job.spec.daily_at:
            job.next_run = next_daily(job.spec.daily_at, time.time())
        self.store.put(job)
        self._changed(job)
        self._wake.set()

    async def _set_final(self, job: Job, state: str) -> None:
        job.state = state
        if state == "cancelled":
            job.finished = time.time()
            self.totals["cancelled"] += 1
        self.store.put(job)
        self._changed(job)
        if job.id in self._procs:
            await self._interrupt(job.id)

    async def _interrupt(self, job_id: str) -> None:
        proc = self._procs.get(job_id)
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGINT)  # the CLI stops cleanly; the journal keeps the progress
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    def _changed(self, job: Job, *, deleted: bool = False) -> None:
        event = {"job": job.to_json(), "deleted": deleted}
        for callback in list(self._subscribers):
            callback(event)
