"""The service's dashboard in a real headless Chromium (Debian's, driven by Playwright): the page
loads with the token, a running job's progress advances, and it is cancelled from the page. A
screenshot goes to ``.artifacts/``."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.servers.sync_service import TOKEN, Service, fill, profiles

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / ".artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium in a closed network: no background calls home, no sandbox as root
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("no Debian chromium here (deploy/install-system-deps.sh installs it)")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def test_dashboard_shows_progress_and_cancels_a_job(
    browser, rclone_s3, s3_proxy, tmp_path, buckets
) -> None:
    src, dst, store = buckets
    fill(store, 80, 64 * 1024)
    svc = Service(tmp_path, profiles(rclone_s3, s3_proxy)).start()
    try:
        spec = {"source": f"s3://s3@{src}/", "destination": f"s3://far@{dst}/", "bwlimit": "400K",
                "transfers": 2, "name": "dash"}  # fmt: skip
        _, job = svc.call("POST", "/api/v1/jobs", spec)
        page = browser.new_page()
        page.goto(f"{svc.url}/#token={TOKEN}")
        row = page.locator(f'tr[data-job="{job["id"]}"]')
        row.wait_for(timeout=20_000)
        assert "dash" in row.inner_text()
        assert "token=" not in page.url  # the token left the address bar
        page.click(f'a[href="#job={job["id"]}"]')
        page.wait_for_selector("#detail:not([hidden])")

        def copied() -> int:
            text = page.locator("#d-cards .card", has_text="objects").inner_text()
            return int(text.split("\n")[-1].split("/")[0])

        deadline = time.monotonic() + 60
        first = None
        while time.monotonic() < deadline:
            n = copied()
            if first is None and n > 0:
                first = n
            if first is not None and n > first:
                break
            time.sleep(0.3)
        assert first is not None and copied() > first, "progress did not advance on the page"
        page.wait_for_selector("#rate-line", timeout=10_000)  # the throughput chart has a line
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-job.png"), full_page=True)
        page.click("#b-cancel")
        page.wait_for_selector("#d-title.state-cancelled", timeout=15_000)
        assert svc.call("GET", f"/api/v1/jobs/{job['id']}")[1]["state"] == "cancelled"
        assert page.locator("#b-resume").is_disabled() and page.locator("#b-cancel").is_disabled()
        fresh = browser.new_page()  # no token: the page asks for one, and shows no jobs
        fresh.goto(f"{svc.url}/")
        fresh.wait_for_selector("#login:not([hidden])")
        assert fresh.locator(f'tr[data-job="{job["id"]}"]').count() == 0
    finally:
        svc.stop()
