"""The HTTP side of ``babel-sync serve``: the JSON API under ``/api/v1``, its OpenAPI document,
server-sent progress events and Prometheus metrics.

Every request but ``/healthz`` needs ``Authorization: Bearer <token>`` (401 otherwise); a bad
request is a 400 whose message names the field; an unknown job is a 404. One middleware does
all three, as in the pcache worker.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .config import ServiceConfig
from .jobs import BadRequest, JobNotFound, JobSpec
from .runner import JobRunner, RunnerOptions

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RUNNER: web.AppKey[JobRunner] = web.AppKey("runner", JobRunner)
# the open event streams' queues: shutdown ends them at once (a stream whose reader left would
# otherwise hold the shutdown until its next keep-alive write fails)
_Stream = asyncio.Queue[dict[str, Any] | None]
STREAMS: web.AppKey[set[_Stream]] = web.AppKey("streams", set)
OPEN_PATHS = {"/healthz", "/"}  # the dashboard page holds no data: its API calls carry the token
DASHBOARD = Path(__file__).with_name("static") / "index.html"


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authentication and the error table, in one place."""
    try:
        if request.path not in OPEN_PATHS:
            expected = request.app["token"].reveal()
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
                return web.json_response({"error": "missing or wrong token"}, status=401)
        return await handler(request)
    except web.HTTPException:
        raise
    except asyncio.CancelledError:
        raise
    except BadRequest as exc:
        return web.json_response({"error": str(exc), "field": exc.field}, status=400)
    except JobNotFound as exc:
        return web.json_response({"error": str(exc)}, status=404)
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=500)


async def _body(request: web.Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("body", "not valid JSON") from None


async def dashboard(request: web.Request) -> web.Response:
    return web.Response(
        body=DASHBOARD.read_bytes(),
        content_type="text/html",
        headers={"Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
                 "script-src 'unsafe-inline'; connect-src 'self'"},
    )  # fmt: skip


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def submit(request: web.Request) -> web.Response:
    spec = JobSpec.from_json(await _body(request))
    job = request.app[RUNNER].submit(spec)
    return web.json_response(job.to_json(), status=201)


async def list_jobs(request: web.Request) -> web.Response:
    state = request.query.get("state")
    jobs = [j.to_json() for j in request.app[RUNNER].jobs() if state in (None, j.state)]
    for job in jobs:
        job.pop("history", None)
    return web.json_response({"jobs": jobs})


async def show(request: web.Request) -> web.Response:
    return web.json_response(request.app[RUNNER].get(request.match_info["id"]).to_json())


async def action(request: web.Request) -> web.Response:
    runner, job_id, what = (
        request.app[RUNNER],
        request.match_info["id"],
        request.match_info["action"],
    )
    if what == "pause":
        job = await runner.pause(job_id)
    elif what == "resume":
        job = runner.resume(job_id)
    elif what == "cancel":
        job = await runner.cancel(job_id)
    else:
        raise web.HTTPNotFound()
    return web.json_response(job.to_json())


async def delete(request: web.Request) -> web.Response:
    await request.app[RUNNER].delete(request.match_info["id"])
    return web.json_response({"deleted": request.match_info["id"]})


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one ``data:`` line of JSON per change (all jobs, or ``?job=ID``)."""
    only = request.query.get("job")
    queue: _Stream = asyncio.Queue(maxsize=1000)

    def push(event: dict[str, Any]) -> None:
        if only is None or event["job"]["id"] == only:
            if queue.full():
                queue.get_nowait()  # a slow reader loses old events, never blocks the runner
            queue.put_nowait(event)

    unsubscribe = request.app[RUNNER].subscribe(push)
    streams = request.app[STREAMS]
    streams.add(queue)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    try:
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=15)
                if event is None:  # the service is shutting down
                    break
                event["job"].pop("history", None)
                await response.write(f"data: {json.dumps(event)}\n\n".encode())
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        unsubscribe()
        streams.discard(queue)
    return response


class _JobCollector:
    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner

    def collect(self) -> Any:
        jobs = self.runner.jobs()
        per_job = {
            "listed_objects": ("src_listed", "objects listed at the source"),
            "listed_bytes": ("src_listed_bytes", "bytes listed at the source"),
            "transferred_objects": ("copied", "objects copied"),
            "transferred_bytes": ("copied_bytes", "bytes copied to the destination"),
            "moved_bytes": ("bytes_moved", "bytes that passed through this machine"),
            "verified_objects": ("verified", "objects verified"),
            "mismatches": ("mismatches", "verification mismatches"),
            "failed_objects": ("failed", "objects that failed"),
            "resumed_parts": ("resumed_parts", "parts resumed from the journal"),
            "request_retries": ("request_retries", "store requests retried after transient errors"),
        }
        for name, (key, text) in per_job.items():
            family = CounterMetricFamily(f"babel_sync_job_{name}", text, labels=["job", "name"])
            for job in jobs:
                family.add_metric([job.id, job.spec.name], float(job.progress.get(key, 0)))
            yield family
        errors = CounterMetricFamily(
            "babel_sync_job_errors", "errors by kind", labels=["job", "name", "kind"]
        )
        retries = CounterMetricFamily(
            "babel_sync_job_retries", "objects copied again after a failed verification",
            labels=["job", "name"],
        )  # fmt: skip
        for job in jobs:
            labels = [job.id, job.spec.name]
            errors.add_metric([*labels, "transfer"], float(job.progress.get("failed", 0)))
            errors.add_metric([*labels, "verification"], float(job.progress.get("mismatches", 0)))
            errors.add_metric([*labels, "job"], float(job.state == "failed"))
            verification = (job.report or {}).get("verification", {})
            retries.add_metric(labels, float(verification.get("retried", 0)))
        yield errors
        yield retries
        rate = GaugeMetricFamily("babel_sync_job_rate_bytes", "bytes/s", labels=["job", "name"])
        state = GaugeMetricFamily("babel_sync_jobs", "jobs by state", labels=["state"])
        counts: dict[str, int] = {}
        for job in jobs:
            counts[job.state] = counts.get(job.state, 0) + 1
            if job.state == "running":
                rate.add_metric([job.id, job.spec.name], float(job.to_json()["rate"]))
        for name, count in counts.items():
            state.add_metric([name], count)
        yield rate
        yield state
        queue = GaugeMetricFamily("babel_sync_queue_length", "jobs waiting to run")
        queue.add_metric([], self.runner.queue_length())
        yield queue
        runs = CounterMetricFamily("babel_sync_job_runs", "job runs by outcome", labels=["outcome"])
        for outcome, n in self.runner.totals.items():
            runs.add_metric([outcome], n)
        yield runs


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app["registry"])
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def openapi(request: web.Request) -> web.Response:
    from .openapi import document

    return web.json_response(document())


def build_app(config: ServiceConfig, runner: JobRunner | None = None) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=1 << 20)
    app["token"] = config.token
    runner = runner or JobRunner(
        RunnerOptions(
            config.state_dir,
            max_concurrent=config.max_concurrent,
            objstore_config=config.objstore_config,
            bwlimit=config.bwlimit,
        )
    )
    app[RUNNER] = runner
    streams: set[_Stream] = set()
    app[STREAMS] = streams

    async def end_streams(app: web.Application) -> None:
        for queue in list(streams):
            while queue.full():
                queue.get_nowait()
            queue.put_nowait(None)

    app.on_shutdown.append(end_streams)
    registry = CollectorRegistry()
    registry.register(_JobCollector(runner))  # type: ignore[arg-type]
    app["registry"] = registry

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await runner.start()
        yield
        await runner.stop()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/", dashboard)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/openapi.json", openapi)
    app.router.add_post("/api/v1/jobs", submit)
    app.router.add_get("/api/v1/jobs", list_jobs)
    app.router.add_get("/api/v1/events", events)
    app.router.add_get("/api/v1/jobs/{id}", show)
    app.router.add_delete("/api/v1/jobs/{id}", delete)
    app.router.add_post("/api/v1/jobs/{id}/{action}", action)
    return app


def serve(config: ServiceConfig) -> None:
    host, port = config.host_port
    log.info("babel-sync serve on http://%s:%d (state in %s)", host, port, config.state_dir)
    web.run_app(build_app(config), host=host, port=port, print=None, access_log=None)
