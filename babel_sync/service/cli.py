"""``babel-sync serve`` and ``babel-sync jobs ...`` (the API's command-line client).

The client finds the service through ``--server`` / ``$BABEL_SYNC_SERVER`` (default
``http://127.0.0.1:8470``) and its token through ``--token`` / ``$BABEL_SYNC_TOKEN``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from objstore.cli import CommandError, ExitCode, add_common_options, print_json, use_json_logs

from .config import DEFAULT_LISTEN, ServiceConfig
from .jobs import FINAL


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from .app import serve

    config = ServiceConfig.load(getattr(args, "config", None))
    if config.objstore_config is None and getattr(args, "config", None):
        # one file for both: [service] and the jobs' [profiles.*]
        config = ServiceConfig(
            config.token, config.listen, config.state_dir, config.max_concurrent, config.bwlimit,
            args.config,
        )  # fmt: skip
    logging.getLogger().setLevel(logging.INFO)
    if not args.plain_logs:
        use_json_logs()
    print(
        f"babel-sync serve: http://{config.listen}/ (state in {config.state_dir})", file=sys.stderr
    )
    serve(config)
    return ExitCode.OK


def _request(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    server = (
        args.server or os.environ.get("BABEL_SYNC_SERVER") or f"http://{DEFAULT_LISTEN}"
    ).rstrip("/")
    token = args.token or os.environ.get("BABEL_SYNC_TOKEN", "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        server + path, data=data, method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except (ValueError, AttributeError):
            message = exc.reason
        code = {401: ExitCode.ACCESS, 404: ExitCode.NOT_FOUND, 400: ExitCode.USAGE}.get(
            exc.code, ExitCode.FAILED
        )
        raise CommandError(f"{server}: {exc.code} {message}", code) from None
    except urllib.error.URLError as exc:
        raise CommandError(f"{server}: unreachable ({exc.reason})", ExitCode.UNREACHABLE) from None


def _line(job: dict[str, Any]) -> str:
    p = job.get("progress", {})
    pct = f"{job['percent']:.0f}%" if job.get("percent") is not None else "-"
    return (f"{job['id']}  {job['state']:<13} {pct:>5}  {p.get('copied', 0):>7} objects "
            f"{p.get('copied_bytes', 0):>14,} bytes  {job['spec']['source']} -> {job['spec']['destination']}")  # fmt: skip


def cmd_jobs(args: argparse.Namespace) -> int:
    what = args.jobs_command
    if what == "submit":
        spec: dict[str, Any] = {"source": args.src, "destination": args.dst, "mode": args.mode,
                                "verify": args.verify, "transfers": args.transfers}  # fmt: skip
        if args.delete:
            spec["delete"] = True
        if args.bwlimit:
            spec["bwlimit"] = args.bwlimit
        if args.every:
            spec["every_minutes"] = args.every
        if args.daily_at:
            spec["daily_at"] = args.daily_at
        if args.name:
            spec["name"] = args.name
        if args.part_size:
            spec["part_size"] = args.part_size
        if args.engine != "local":
            spec["engine"] = args.engine
        if args.ray_address:
            spec["ray_address"] = args.ray_address
        job = _request(args, "POST", "/api/v1/jobs", spec)
        if args.wait:
            return _wait(args, job["id"])
        print_json(job) if args.json else print(job["id"])
    elif what == "wait":
        return _wait(args, args.id)
    elif what == "list":
        jobs = _request(args, "GET", "/api/v1/jobs")["jobs"]
        if args.json:
            print_json(jobs)
        else:
            for job in jobs:
                print(_line(job))
    elif what == "show":
        _print_job(args, _request(args, "GET", f"/api/v1/jobs/{args.id}"), report=True)
    elif what == "delete":
        _request(args, "DELETE", f"/api/v1/jobs/{args.id}")
    else:
        job = _request(args, "POST", f"/api/v1/jobs/{args.id}/{what}")
        print_json(job) if args.json else print(_line(job))
    return ExitCode.OK


def _print_job(args: argparse.Namespace, job: dict[str, Any], *, report: bool = False) -> None:
    if args.json:
        print_json(job)
        return
    print(_line(job))
    if job.get("error"):
        print(f"error: {job['error']}")
    if report and job.get("report"):
        print(json.dumps(job["report"], indent=2))


# what a finished job means for the exit status
_OUTCOME = {"succeeded": ExitCode.OK, "verify_failed": ExitCode.VERIFY}


def _wait(args: argparse.Namespace, job_id: str) -> int:
    """Poll until the job ends; its outcome is the exit status (0, 6 verification, 1 other)."""
    deadline = time.monotonic() + args.timeout if args.timeout else None
    shown = ""
    while True:
        job = _request(args, "GET", f"/api/v1/jobs/{job_id}")
        if job["state"] in FINAL:
            break
        if job["state"] == "scheduled":
            raise CommandError(
                f"job {job_id} is scheduled (it runs again and again); `jobs wait` is for one run",
                ExitCode.USAGE,
            )
        if not args.json and sys.stderr.isatty():
            line = _line(job)
            if line != shown:
                print("\r" + line[:150], end="", file=sys.stderr, flush=True)
                shown = line
        if deadline is not None and time.monotonic() > deadline:
            raise CommandError(f"job {job_id} still {job['state']} after {args.timeout:g}s")
        time.sleep(args.poll)
    if shown:
        print(file=sys.stderr)
    _print_job(args, job)
    return _OUTCOME.get(job["state"], ExitCode.FAILED)


def add_commands(sub: Any) -> None:
    serve = sub.add_parser(
        "serve", help="run the sync service (job queue, API, metrics)",
        description="Run the sync service. --config FILE holds its [service] table and the "
        "jobs' [profiles.*]; BABEL_SYNC_TOKEN and BABEL_SYNC_LISTEN override.",
    )  # fmt: skip
    serve.add_argument("--plain-logs", action="store_true", help="text logs instead of JSON lines")
    add_common_options(serve, subcommand=True)
    serve.set_defaults(func=cmd_serve)

    jobs = sub.add_parser("jobs", help="submit and control jobs on a running service")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)

    def client(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--server", help="service URL (default: $BABEL_SYNC_SERVER or http://127.0.0.1:8470)"
        )
        p.add_argument("--token", help="API token (default: $BABEL_SYNC_TOKEN)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        add_common_options(p, subcommand=True)
        p.set_defaults(func=cmd_jobs)

    submit = jobs_sub.add_parser("submit", help="queue a sync/copy/check job")
    submit.add_argument("src")
    submit.add_argument("dst")
    submit.add_argument("--mode", choices=["sync", "copy", "check"], default="sync")
    submit.add_argument("--delete", action="store_true")
    submit.add_argument("--verify", choices=["none", "runtime", "sample", "full"], default="sample")
    submit.add_argument("--transfers", type=int, default=16)
    submit.add_argument("--bwlimit", help="bytes per second for this job, e.g. 50M")
    submit.add_argument("--every", type=float, metavar="MIN", help="run again every MIN minutes")
    submit.add_argument("--daily-at", metavar="HH:MM", help="run every day at this UTC time")
    submit.add_argument("--name", default="")
    submit.add_argument("--part-size", help="multipart part size, e.g. 64MiB (default: auto)")
    submit.add_argument("--engine", choices=["local", "ray"], default="local")
    submit.add_argument("--ray-address", metavar="ADDR", help="the Ray cluster for --engine ray")
    submit.add_argument(
        "--wait", action="store_true",
        help="wait for the job to end; exit 0 if it succeeded, 6 on a verification mismatch, "
        "1 if it failed or was cancelled",
    )  # fmt: skip

    def waiting(p: argparse.ArgumentParser) -> None:
        p.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds")
        p.add_argument("--poll", type=float, default=1.0, metavar="S", help=argparse.SUPPRESS)

    waiting(submit)
    client(submit)
    wait = jobs_sub.add_parser(
        "wait", help="wait for one job to end; its outcome is the exit status (as submit --wait)"
    )
    wait.add_argument("id")
    waiting(wait)
    client(wait)
    client(jobs_sub.add_parser("list", help="all jobs"))
    for action in ("show", "pause", "resume", "cancel", "delete"):
        p = jobs_sub.add_parser(action, help=f"{action} one job")
        p.add_argument("id")
        client(p)
