"""The dashboard in a real headless Chromium, fed by a live demo-style run."""

from __future__ import annotations

import shutil
import time

import pytest
from playwright.sync_api import sync_playwright

from edgefl.api.server import DashboardServer
from edgefl.store import make_store
from tests.harness import Deployment

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():  # noqa: ANN201
    assert shutil.which("chromium") or shutil.os.path.exists(CHROMIUM), (
        "Debian's chromium is required (apt-get install chromium chromium-driver; make test "
        "installs it)"
    )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def test_dashboard_follows_a_live_session(mosquitto, tmp_path, browser) -> None:  # noqa: ANN001
    dep = Deployment(mosquitto.url, tmp_path)
    try:
        dep.start_combiners(2)
        dep.start_fleet(10)
        ctl = dep.controller()
        server = DashboardServer(make_store(dep.state_url), port=0).start()
        dep.stack.callback(server.stop)
        page = browser.new_page()
        page.goto(server.url)
        page.wait_for_selector("#session-name")
        assert "waiting" in page.inner_text("#session-name")

        _, rounds = dep.run_session(ctl, rounds=6, min_devices=10, round_timeout_s=30)
        # the page polls once a second; give it a few ticks to catch up
        page.wait_for_function(
            "document.querySelectorAll('#rounds-table tbody tr').length === 6", timeout=10_000
        )
        assert page.inner_text("#session-status") == "completed"
        assert page.inner_text("#round-count").replace(" ", "") == "6/6"
        shown = float(page.inner_text("#accuracy"))
        assert shown == pytest.approx(rounds[-1].metrics["accuracy"], abs=1e-4)
        first_row = page.locator("#rounds-table tbody tr").first
        assert first_row.get_attribute("data-round") == "6"
        box = page.locator("#accuracy-chart").bounding_box()
        assert box and box["width"] > 200 and box["height"] > 100
        # the chart really has ink: some pixels differ from the blank background
        inked = page.evaluate("""() => {
            const c = document.getElementById('accuracy-chart');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 0; i < d.length; i += 4) {
                if (d[i + 3] > 0 && d[i + 2] > 200 && d[i] < 100) n++;  // blue-ish ink
            }
            return n; }""")
        assert inked > 50, "no accuracy curve was drawn"
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    finally:
        time.sleep(0.1)
        dep.close()
