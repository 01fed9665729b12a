"""The service's pieces without a server: schedules, job validation, bandwidth shares."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from babel_sync.service.jobs import BadRequest, Job, JobSpec, next_daily
from babel_sync.service.runner import JobRunner, RunnerOptions
from objstore.cli import parse_size

SPEC = {"source": "s3://a@src/", "destination": "s3://b@dst/"}


def test_next_daily_by_hand() -> None:
    now = 1000.0  # 1970-01-01 00:16:40 UTC
    assert next_daily("00:30", now) == 1800.0
    assert next_daily("00:10", now) == 600.0 + 86400
    assert next_daily("23:59", 86400 * 3 + 5) == 86400 * 3 + 23 * 3600 + 59 * 60
    with pytest.raises(ValueError):
        next_daily("24:00", now)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"daily_at": "7:30"}, "daily_at"),
        ({"daily_at": "07:30", "every_minutes": 5}, "daily_at"),
        ({"every_minutes": 0}, "every_minutes"),
        ({"bwlimit": "fast"}, "bwlimit"),
        ({"include": "*.bin"}, "include"),
        ({"engine": "spark"}, "engine"),
        ({"part_size": "1MiB"}, "part_size"),
        ({"ray_address": ""}, "ray_address"),
    ],
)
def test_job_spec_refuses(extra: dict, field: str) -> None:
    with pytest.raises(BadRequest) as caught:
        JobSpec.from_json({**SPEC, **extra})
    assert caught.value.field == field


def test_cli_arguments_of_a_job() -> None:
    spec = JobSpec.from_json({**SPEC, "mode": "sync", "delete": True, "bwlimit": "5M",
                              "include": ["*.bin"], "exclude": ["tmp/*"], "verify": "full"})  # fmt: skip
    assert spec.cli_args() == [
        "sync", "s3://a@src/", "s3://b@dst/", "--verify", "full", "--transfers", "16",
        "--delete", "--bwlimit", "5M", "--include", "*.bin", "--exclude", "tmp/*",
    ]  # fmt: skip
    job = Job("j1", spec)
    assert Job.from_json(job.to_json()) == job
    ray = JobSpec.from_json({**SPEC, "engine": "ray", "ray_address": "10.0.0.1:6379"})
    assert ray.cli_args()[-4:] == ["--engine", "ray", "--ray-address", "10.0.0.1:6379"]


def test_global_bandwidth_is_split_between_running_jobs(tmp_path: Path) -> None:
    runner = JobRunner(RunnerOptions(tmp_path, bwlimit="12M"))
    try:
        job = Job("j1", JobSpec.from_json(SPEC))
        args = runner._command(job)
        assert args[args.index("--bwlimit") + 1] == str(parse_size("12M"))
        runner._procs["other"] = object()  # type: ignore[assignment]  # one job already running
        args = runner._command(job)
        assert args[args.index("--bwlimit") + 1] == str(parse_size("12M") // 2)
        own = Job("j2", JobSpec.from_json({**SPEC, "bwlimit": "1M"}))
        args = runner._command(own)
        assert args.count("--bwlimit") == 1 and args[args.index("--bwlimit") + 1] == "1M"
    finally:
        runner._procs.clear()
        runner.store.close()


def test_a_daily_job_waits_for_its_time(tmp_path: Path) -> None:
    async def scenario() -> Job:
        runner = JobRunner(RunnerOptions(tmp_path))
        try:
            return runner.submit(JobSpec.from_json({**SPEC, "daily_at": "03:00"}))
        finally:
            runner.store.close()

    job = asyncio.run(scenario())
    assert (
        job.state == "scheduled" and job.next_run is not None and job.next_run % 86400 == 3 * 3600
    )


@pytest.mark.integration  # starts a process
def test_a_job_whose_process_cannot_start_fails_with_the_reason(tmp_path: Path) -> None:
    async def scenario() -> Job:
        runner = JobRunner(RunnerOptions(tmp_path, python=str(tmp_path / "no-such-python")))
        try:
            job = runner.submit(JobSpec.from_json(SPEC))
            runner._launch(job)
            await asyncio.gather(*runner._tasks)
            return runner.get(job.id)
        finally:
            runner.store.close()

    job = asyncio.run(scenario())
    assert job.state == "failed" and "cannot start" in job.error and job.id
