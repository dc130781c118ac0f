"""The dashboard's "download logs" button, in a real headless Chromium: a viewer downloads the
shown session's log lines (fetched with the bearer header), and only that session's."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from edgefl.api.server import DashboardServer
from edgefl.auth.tokens import AuthConfig, Role, generate_secret
from edgefl.observability.logs import SessionLogWriter, log_context
from edgefl.store import make_store
from edgefl.store.base import SessionRecord

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]

pytestmark = pytest.mark.slow  # a browser: `make test-fast` leaves it out


def test_a_viewer_downloads_the_shown_sessions_logs(tmp_path: Path) -> None:
    assert os.path.exists(CHROMIUM), f"Debian's headless Chromium is required at {CHROMIUM}"
    store = make_store(f"sqlite:///{tmp_path / 'state.db'}")
    store.create_session(SessionRecord("s1", "p", {"rounds": 2}, "completed", 2, "v2", 1.0, 1.0))
    store.create_session(SessionRecord("s2", "p", {"rounds": 1}, "completed", 1, "w1", 2.0, 2.0))
    logs = tmp_path / "logs"
    log = logging.getLogger("edgefl.test.dashboardlogs")
    log.setLevel(logging.INFO)
    writer = SessionLogWriter(logs, project="p").attach(log)
    try:
        for sid, rounds in (("s1", 2), ("s2", 1)):
            for r in range(1, rounds + 1):
                with log_context(project="p", session=sid, round=r, task_id=f"{sid}:{r}:0"):
                    log.info("round %s:%d:0 done", sid, r)
    finally:
        writer.close()
    auth = AuthConfig(secret=generate_secret())
    server = DashboardServer(store, port=0, auth=auth, project="p", logs=logs).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                page = browser.new_page()
                page.goto(server.url)
                page.wait_for_selector("#login-form", state="visible", timeout=5000)
                page.fill("#token-input", auth.issuer().issue("eve", Role.viewer, "p"))
                page.click("#login-button")
                # the newest session (s2) is shown first; pick s1 from the list
                page.wait_for_selector("#session-logs", state="visible", timeout=10_000)
                page.click("#sessions-table tr[data-session='s1']")
                page.wait_for_function(
                    "document.querySelector(\"#sessions-table tr[data-session='s1']\")"
                    ".className === 'selected'",
                    timeout=10_000,
                )
                with page.expect_download() as dl:
                    page.click("#session-logs")
                assert dl.value.suggested_filename == "s1.jsonl"
                lines = Path(dl.value.path()).read_text().splitlines()
            finally:
                browser.close()
    finally:
        server.stop()
        store.close()
    records = [json.loads(line) for line in lines]
    assert [(r["session"], r["round"], r["msg"]) for r in records] == [
        ("s1", 1, "round s1:1:0 done"),
        ("s1", 2, "round s1:2:0 done"),
    ]
