"""``babel-sync serve`` as a real process over the real S3 server: the API contract, auth,
jobs that run, pause, resume and cancel, restarts mid-job, events, metrics, the CLI client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from objstore import Config, open_store
from tests.servers.sync_service import TOKEN, Service, fill, profiles

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[2]


def test_every_request_needs_the_token(service: Service) -> None:
    assert service.call("GET", "/healthz", token=None)[0] == 200
    for token in (None, "wrong-token-wrong-token"):
        status, body = service.call("GET", "/api/v1/jobs", token=token)
        assert status == 401 and "token" in body["error"]
        assert service.call("POST", "/api/v1/jobs", {"source": "x"}, token=token)[0] == 401
    assert service.call("GET", "/metrics", token=None)[0] == 401


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"destination": "s3://s3@b/"}, "source"),
        ({"source": "s3://s3@b/", "destination": "s3:/x"}, "destination"),
        ({"source": "s3://s3@b/", "destination": "s3://s3@c/", "mode": "move"}, "mode"),
        ({"source": "s3://s3@b/", "destination": "s3://s3@c/", "transfers": 0}, "transfers"),
        ({"source": "s3://s3@b/", "destination": "s3://s3@c/", "colour": "red"}, "colour"),
        (
            {"source": "s3://s3@b/", "destination": "s3://s3@c/", "mode": "copy", "delete": True},
            "delete",
        ),
        ([1, 2], "body"),
    ],
)
def test_bad_requests_name_the_field(service: Service, body: Any, field: str) -> None:
    status, answer = service.call("POST", "/api/v1/jobs", body)
    assert status == 400 and answer["field"] == field, answer
    assert answer["error"].startswith(f"{field}: ")


def test_unknown_job_is_404(service: Service) -> None:
    assert service.call("GET", "/api/v1/jobs/nope")[0] == 404
    assert service.call("POST", "/api/v1/jobs/nope/cancel")[0] == 404


def test_openapi_document_lists_every_route(service: Service) -> None:
    status, doc = service.call("GET", "/api/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {
        "/api/v1/jobs",
        "/api/v1/jobs/{id}",
        "/api/v1/jobs/{id}/pause",
        "/api/v1/events",
    } <= set(doc["paths"])
    spec = doc["components"]["schemas"]["JobSpec"]
    from babel_sync.service.jobs import JobSpec

    assert set(spec["properties"]) == set(JobSpec.__dataclass_fields__)


def test_a_job_runs_to_a_verified_result(service: Service, buckets) -> None:
    src, dst, store = buckets
    fill(store, 12, 40_000)
    status, job = service.call(
        "POST",
        "/api/v1/jobs",
        {"source": f"s3://s3@{src}/", "destination": f"s3://s3@{dst}/", "name": "t1"},
    )
    assert status == 201 and job["state"] == "queued"
    done = service.wait_state(job["id"], ("succeeded", "failed", "verify_failed"))
    assert done["state"] == "succeeded", done
    assert (
        done["report"]["counters"]["copied"] == 12 and done["report"]["counters"]["verified"] == 12
    )
    assert done["report"]["verification"]["mode"] == "sample"
    assert done["progress"]["copied_bytes"] == 12 * 40_000, done["progress"]
    assert done["percent"] == 100.0
    _, metrics = service.call("GET", "/metrics")
    assert (
        f'babel_sync_job_transferred_bytes_total{{job="{job["id"]}",name="t1"}} 480000.0' in metrics
    )
    assert 'babel_sync_jobs{state="succeeded"} 1.0' in metrics
    assert (
        f'babel_sync_job_errors_total{{job="{job["id"]}",kind="verification",name="t1"}} 0.0'
        in metrics
    )
    assert f'babel_sync_job_retries_total{{job="{job["id"]}",name="t1"}} 0.0' in metrics
    # rclone serve s3 now and then answers a copy into a fresh bucket with a 500, retried: the
    # metric says how many requests were, as the job's own progress does
    retried = float(done["progress"].get("request_retries", 0))
    assert (
        f'babel_sync_job_request_retries_total{{job="{job["id"]}",name="t1"}} {retried}' in metrics
    )
    _, listing = service.call("GET", "/api/v1/jobs?state=succeeded")
    assert [j["id"] for j in listing["jobs"]] == [job["id"]]
    # JSON logs: one object per line, the job's events findable by id, the token nowhere
    text = service.log.read_text()
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    mine = [e for e in events if e.get("job") == job["id"]]
    assert [e["event"] for e in mine] == ["start", "succeeded"] and mine[1]["copied"] == 12
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in events)
    assert TOKEN not in text


def slow_spec(src: str, dst: str, bwlimit: str) -> dict[str, Any]:
    """A job that streams through the proxy (no server-side copy) at ``bwlimit``."""
    return {"source": f"s3://s3@{src}/", "destination": f"s3://far@{dst}/", "bwlimit": bwlimit,
            "transfers": 2}  # fmt: skip


def test_pause_resume_and_cancel(service: Service, buckets, rclone_s3) -> None:
    src, dst, store = buckets
    fill(store, 60, 64 * 1024)
    spec = slow_spec(src, dst, "600K")
    _, job = service.call("POST", "/api/v1/jobs", spec)
    service.wait_copied(job["id"], 3)
    status, paused = service.call("POST", f"/api/v1/jobs/{job['id']}/pause")
    assert status == 200 and paused["state"] == "paused"
    dst_store = open_store(
        f"s3://s3@{dst}/", Config.from_mapping({"profiles": {"s3": rclone_s3.profile()}}, env={})
    )
    copied_at_pause = len(list(dst_store.iter_list()))
    time.sleep(1.5)
    assert service.call("GET", f"/api/v1/jobs/{job['id']}")[1]["state"] == "paused"
    assert service.call("POST", f"/api/v1/jobs/{job['id']}/pause")[0] == 400  # not twice
    assert service.call("POST", f"/api/v1/jobs/{job['id']}/resume")[1]["state"] == "queued"
    done = service.wait_state(job["id"], ("succeeded", "failed"), timeout=120)
    assert done["state"] == "succeeded" and done["runs"] == 2
    counters = done["report"]["counters"]
    assert (
        counters["copied"] + counters["skipped"] == 60
        and counters["skipped"] >= copied_at_pause > 0
    )
    # cancel: a second job stops for good
    _, other = service.call(
        "POST", "/api/v1/jobs", {**spec, "destination": f"s3://s3@{dst}/again/"}
    )
    service.wait_state(other["id"], ("running",))
    assert service.call("POST", f"/api/v1/jobs/{other['id']}/cancel")[1]["state"] == "cancelled"
    time.sleep(1)
    assert service.call("GET", f"/api/v1/jobs/{other['id']}")[1]["state"] == "cancelled"
    assert service.call("DELETE", f"/api/v1/jobs/{other['id']}")[0] == 200
    assert service.call("GET", f"/api/v1/jobs/{other['id']}")[0] == 404


def test_restart_mid_job_resumes_and_loses_nothing(
    rclone_s3, s3_proxy, tmp_path: Path, buckets
) -> None:
    src, dst, store = buckets
    fill(store, 50, 64 * 1024)
    svc = Service(tmp_path, profiles(rclone_s3, s3_proxy)).start()
    try:
        _, job = svc.call("POST", "/api/v1/jobs", slow_spec(src, dst, "500K"))
        svc.wait_copied(job["id"], 3)
        svc.kill()  # no goodbye: the job's process dies with the service
        svc.start()
        done = svc.wait_state(job["id"], ("succeeded", "failed"), timeout=120)
    finally:
        svc.stop()
    assert done["state"] == "succeeded", done
    counters = done["report"]["counters"]
    assert counters["skipped"] > 0 and counters["copied"] + counters["skipped"] == 50
    assert counters["mismatches"] == 0
    dst_store = open_store(
        f"s3://s3@{dst}/", Config.from_mapping({"profiles": {"s3": rclone_s3.profile()}}, env={})
    )
    assert sorted(o.key for o in dst_store.iter_list()) == sorted(o.key for o in store.iter_list())


def test_event_stream_reports_progress(service: Service, buckets) -> None:
    src, dst, store = buckets
    fill(store, 5, 10_000)
    request = urllib.request.Request(
        service.url + "/api/v1/events", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    stream = urllib.request.urlopen(request, timeout=30)
    _, job = service.call(
        "POST", "/api/v1/jobs", {"source": f"s3://s3@{src}/", "destination": f"s3://s3@{dst}/"}
    )
    states = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = stream.readline().decode().strip()
        if line.startswith("data: "):
            event = json.loads(line[6:])
            if event["job"]["id"] == job["id"]:
                states.append(event["job"]["state"])
                if event["job"]["state"] == "succeeded":
                    break
    stream.close()
    assert states[0] == "queued" and "running" in states and states[-1] == "succeeded"


def test_cli_client(service: Service, buckets) -> None:
    src, dst, store = buckets
    fill(store, 3, 1000)
    env = {**os.environ, "BABEL_SYNC_SERVER": service.url, "BABEL_SYNC_TOKEN": TOKEN}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "babel_sync.cli", "jobs", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    submitted = cli("submit", f"s3://s3@{src}/", f"s3://s3@{dst}/", "--name", "from-cli")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    service.wait_state(job_id, ("succeeded",))
    shown = cli("show", job_id, "--json")
    assert json.loads(shown.stdout)["spec"]["name"] == "from-cli"
    assert job_id in cli("list").stdout
    missing = cli("show", "nope")
    assert missing.returncode == 3 and "404" in missing.stderr
    wrong = subprocess.run([sys.executable, "-m", "babel_sync.cli", "jobs", "list", "--token", "bad-token-bad-token"],
                           cwd=REPO, env={**env}, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert wrong.returncode == 4 and "401" in wrong.stderr
    # --wait: the job's outcome is the exit status
    waited = cli("submit", f"s3://s3@{src}/", f"s3://s3@{dst}/", "--wait", "--verify", "full",
                 "--json", "--poll", "0.2")  # fmt: skip
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["state"] == "succeeded"
    assert cli("wait", job_id).returncode == 0 and "succeeded" in cli("wait", job_id).stdout
    failing = cli("submit", f"s3://s3@{src}/", "s3://s3@no-such-bucket-anywhere/", "--wait",
                  "--poll", "0.2")  # fmt: skip
    assert failing.returncode == 1 and "failed" in failing.stdout, failing.stdout + failing.stderr


def _schema(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}


def test_responses_match_the_openapi_document(service: Service, buckets) -> None:
    """A contract test in the spirit of schemathesis: every answer validates against the
    document's schemas, and every constrained field of JobSpec refuses a value outside them."""
    import jsonschema

    src, dst, store = buckets
    fill(store, 2, 1000)
    _, doc = service.call("GET", "/api/v1/openapi.json")
    job_schema, error_schema = _schema(doc, "Job"), _schema(doc, "Error")
    valid = {"source": f"s3://s3@{src}/", "destination": f"s3://s3@{dst}/", "name": "contract"}
    jsonschema.validate(valid, _schema(doc, "JobSpec"))
    status, job = service.call("POST", "/api/v1/jobs", valid)
    assert status == 201
    jsonschema.validate(job, job_schema)
    done = service.wait_state(job["id"], ("succeeded",))
    jsonschema.validate(done, job_schema)
    _, listing = service.call("GET", "/api/v1/jobs")
    for item in listing["jobs"]:
        jsonschema.validate(item, job_schema)
    for method, path, body in (
        ("GET", "/api/v1/jobs/nope", None),
        ("POST", "/api/v1/jobs/nope/pause", None),
        ("POST", f"/api/v1/jobs/{job['id']}/resume", None),  # not paused: 400
        ("POST", "/api/v1/jobs", {"source": 1}),
    ):
        status, answer = service.call(method, path, body)
        assert status in (400, 404), (method, path, status)
        jsonschema.validate(answer, error_schema)
        template = path.replace(job["id"], "{id}").replace("nope", "{id}")
        assert str(status) in doc["paths"][template][method.lower()]["responses"], (
            template,
            status,
        )
    # every enum, bound and type in JobSpec is enforced by the service as documented
    props = doc["components"]["schemas"]["JobSpec"]["properties"]
    wrong: dict[str, Any] = {}
    for name, raw in props.items():
        kind = raw.get("type")
        if isinstance(kind, list):
            kind = next(t for t in kind if t != "null")
        prop = {**raw, "type": kind}
        if "enum" in prop:
            wrong[name] = "not-" + prop["enum"][0]
        elif prop.get("type") == "integer":
            wrong[name] = prop.get("maximum", 10) + 1
        elif prop.get("type") == "boolean":
            wrong[name] = "yes"
        elif prop.get("type") == "array":
            wrong[name] = "not-a-list"
        elif prop.get("type") == "number":
            wrong[name] = -1
        elif "maxLength" in prop:
            wrong[name] = "x" * (prop["maxLength"] + 1)
    assert set(wrong) >= {
        "mode",
        "verify",
        "transfers",
        "delete",
        "include",
        "exclude",
        "every_minutes",
        "name",
    }
    for name, value in wrong.items():
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**valid, name: value}, _schema(doc, "JobSpec"))
        status, answer = service.call("POST", "/api/v1/jobs", {**valid, name: value})
        assert status == 400 and answer["field"] == name, (name, value, answer)


def test_a_scheduled_job_runs_again(service: Service, buckets) -> None:
    src, dst, store = buckets
    fill(store, 2, 1000)
    spec = {"source": f"s3://s3@{src}/", "destination": f"s3://s3@{dst}/", "every_minutes": 0.03}
    _, job = service.call("POST", "/api/v1/jobs", spec)
    first = service.wait_state(job["id"], ("succeeded",))
    assert first["runs"] == 1 and first["next_run"] == pytest.approx(first["started"] + 1.8)
    store.put("data/late.bin", b"arrived after the first run")
    deadline = time.monotonic() + 30
    while True:
        _, now = service.call("GET", f"/api/v1/jobs/{job['id']}")
        if now["runs"] >= 2 and now["state"] == "succeeded":
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.2)
    assert now["report"]["counters"]["copied"] == 1  # only the new object
    assert now["started"] >= first["started"] + 1.8
