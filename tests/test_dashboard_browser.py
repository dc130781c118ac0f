"""The dashboard in a real headless Chromium: fed straight from a store, then by live runs.

The browser logs in the way a person does: it pastes a JWT into the page's login form. The
page follows the store over Server-Sent Events (edgefl/api/events.py), never by reloading;
screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, Page, sync_playwright

from edgefl.api.app import create_app
from edgefl.api.server import DashboardServer
from edgefl.auth.revocation import revoke_subject
from edgefl.auth.tokens import AuthConfig, Role, generate_secret
from edgefl.controller import SessionConfig, SessionFailed
from edgefl.controller.service import ControllerService
from edgefl.store import make_store
from edgefl.store.base import RoundRecord, SessionRecord, Store
from edgefl.store.blobs import FileBlobStore
from edgefl.tasks import digits
from tests.harness import Deployment, RogueDevice

pytestmark = pytest.mark.slow  # end-to-end runs: `make test-fast` leaves them out

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
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # git-ignored
ROWS = "#rounds-table tbody tr"
# the points plotted on a chart: one <circle data-round> per completed round
POINTS = "(id) => document.querySelectorAll('#' + id + ' circle[data-round]').length"


def _points(page: Page, chart: str = "accuracy-chart") -> int:
    return int(page.evaluate(POINTS, chart))


def _shot(page: Page, name: str) -> Path:
    """A full-page screenshot into tests/artifacts/ (CI keeps the folder), path printed."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # never skip: a dashboard nobody looked at is the thing this test exists to prevent
    assert os.path.exists(CHROMIUM), (
        f"Debian's headless Chromium is required at {CHROMIUM}: "
        "apt-get install -y chromium chromium-driver (make test installs it)"
    )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def auth(tmp_path) -> AuthConfig:
    """HS256 with a revocation list, so a test can revoke the logged-in viewer."""
    return AuthConfig(secret=generate_secret(), revocations=str(tmp_path / "revoked.json"))


def _login(page: Page, token: str) -> None:
    """What a person does: paste the token into the login form and submit it."""
    page.wait_for_selector("#login-form", state="visible", timeout=5000)
    page.fill("#token-input", token)
    page.click("#login-button")


@pytest.fixture
def served(tmp_path, auth) -> Iterator[tuple[Store, str]]:
    """The app in uvicorn on a loopback port, over its own store on a file the test writes."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    writer, reader = make_store(url), make_store(url)  # like a controller and a dashboard
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(reader, auth, project="p"),
            host="127.0.0.1",
            port=_free_port(),
            log_level="warning",
            lifespan="off",
        )
    )
    thread = threading.Thread(target=server.run, name="dashboard-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield writer, f"http://127.0.0.1:{server.config.port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        writer.close()
        reader.close()


def _complete_round(store: Store, sid: str, r: int, accuracy: float, loss: float) -> None:
    store.start_round(
        RoundRecord(
            f"{sid}:{r}:0", sid, r, 0, "running", f"v{r - 1}", None, ["d1", "d2", "d3"], started=r
        )
    )
    store.finish_round(
        f"{sid}:{r}:0",
        status="completed",
        model_out=f"v{r}",
        participants=[{"device": "d1", "n": 10, "metrics": {}}] * 2,
        metrics={"accuracy": accuracy, "loss": loss},
        finished=r + 0.25,
    )
    store.update_session(sid, current_round=r, model_version=f"v{r}")


def _rows(page: Page) -> list[list[str]]:
    return [
        [td.strip() for td in row.locator("td").all_inner_texts()]
        for row in page.locator(ROWS).all()
    ]


def test_dashboard_shows_stored_rounds_and_follows_new_ones(served, auth, browser) -> None:
    store, url = served
    store.create_session(SessionRecord("old", "p", {"rounds": 2}, "completed", 2, "o2", 1.0, 1.0))
    store.create_session(
        SessionRecord("s1", "p", {"rounds": 5, "aggregator": "fedavg"}, "running", 0, "v0", 2, 2)
    )
    _complete_round(store, "s1", 1, 0.52, 1.4)
    _complete_round(store, "s1", 2, 0.71, 0.9)

    page = browser.new_page(viewport={"width": 1200, "height": 900})
    try:
        page.goto(url)
        assert page.is_hidden("#dash")  # no token yet: only the login form
        _login(page, "not-a-jwt")
        page.wait_for_function(
            "document.getElementById('login-error').textContent.includes('invalid token')",
            timeout=5000,
        )
        device = auth.issuer().issue("dev-1", Role.device, "p", region="region-0")
        _login(page, device)  # a valid token, but a service's: refused with the reason
        page.wait_for_function(
            "document.getElementById('login-error').textContent.includes(\"role 'device'\")",
            timeout=5000,
        )
        assert page.is_hidden("#dash")
        _login(page, auth.issuer().issue("vic", Role.viewer, "p"))
        page.wait_for_function(f"document.querySelectorAll('{ROWS}').length === 2", timeout=5000)
        assert "s1" in page.inner_text("#session-name")  # the newest session by default
        assert page.inner_text("#session-status") == "running"
        assert page.inner_text("#round-count").replace(" ", "") == "2/5"
        # newest round on top: round, status, accuracy, loss, updates, selected, duration
        assert [r[:7] for r in _rows(page)] == [
            ["2", "completed", "0.7100", "0.9000", "2", "3", "0.250"],
            ["1", "completed", "0.5200", "1.4000", "2", "3", "0.250"],
        ]

        _complete_round(store, "s1", 3, 0.83, 0.5)  # the controller finishes another round
        page.wait_for_function(f"document.querySelectorAll('{ROWS}').length === 3", timeout=5000)
        page.wait_for_function(
            "document.getElementById('round-count').textContent.replace(/ /g, '') === '3/5'",
            timeout=5000,
        )
        assert _rows(page)[0][:3] == ["3", "completed", "0.8300"]
        assert page.inner_text("#accuracy") == "0.8300"

        box = page.locator("#accuracy-chart").bounding_box()
        assert box and box["width"] > 200 and box["height"] > 100
        assert _points(page) == 3 and _points(page, "loss-chart") == 3
        _shot(page, "dashboard-stored.png")

        assert "vic" in page.inner_text("#whoami") and page.is_hidden("#stop-session")
        assert page.is_hidden("#new-session")  # a viewer creates nothing

        page.goto(url + "?session=old")  # an explicit pick wins over "newest"
        page.wait_for_function(  # the token survived the reload (sessionStorage)
            "document.getElementById('session-status').textContent === 'completed'", timeout=5000
        )
        assert "old" in page.inner_text("#session-name") and _rows(page) == []

        revoke_subject(auth.revocations_path() or "", "vic")  # a 401 returns to the login form
        page.wait_for_selector("#login-form", state="visible", timeout=5000)
        page.wait_for_function(
            "document.getElementById('login-error').textContent.includes('revoked')", timeout=5000
        )
        assert page.is_hidden("#dash")
        assert page.evaluate("sessionStorage.getItem('edgefl.token')") is None
    finally:
        page.close()


def test_dashboard_follows_a_live_session(mosquitto, tmp_path, browser) -> None:
    dep = Deployment(mosquitto.url, tmp_path)
    try:
        dep.start_combiners(2)
        dep.start_fleet(10)
        ctl = dep.controller()
        auth = AuthConfig(secret=generate_secret())
        reader = make_store(dep.state_url)
        dep.own(reader)
        server = DashboardServer(reader, port=0, auth=auth, project=dep.project).start()
        dep.own(server)
        page = browser.new_page()
        dep.own(page)
        page.goto(server.url)
        _login(page, auth.issuer().issue("olga", Role.operator, dep.project))
        page.wait_for_function(
            "document.getElementById('session-name').textContent.includes('waiting')",
            timeout=5000,
        )
        assert "olga" in page.inner_text("#whoami")

        _, rounds = dep.run_session(ctl, rounds=6, min_devices=10, round_timeout_s=30)
        # the stream pushes the store's changes within half a second
        page.wait_for_function(f"document.querySelectorAll('{ROWS}').length === 6", timeout=10_000)
        # the session's own record changes after its last round's: it may come a push later
        page.wait_for_function(
            "document.getElementById('session-status').textContent === 'completed'",
            timeout=10_000,
        )
        assert page.inner_text("#round-count").replace(" ", "") == "6/6"
        shown = float(page.inner_text("#accuracy"))
        assert shown == pytest.approx(rounds[-1].metrics["accuracy"], abs=1e-4)
        assert page.locator(ROWS).first.get_attribute("data-round") == "6"
        box = page.locator("#accuracy-chart").bounding_box()
        assert box and box["width"] > 200 and box["height"] > 100
        assert _points(page) == 6 and _points(page, "loss-chart") == 6
    finally:
        dep.close()


# Before the page's own script runs: remember every EventSource it opens, so the test sees the
# browser's streams themselves rather than what the page says about them.
TRACK_STREAMS = """(() => {
    const Native = window.EventSource;
    window.__streams = [];
    window.EventSource = class extends Native {
        constructor(url, init) { super(url, init); window.__streams.push(this); }
    };
})();"""
OPEN_STREAMS = """() => window.__streams.filter(s => s.readyState === EventSource.OPEN)
    .map(s => new URL(s.url).pathname).sort()"""
ROUND = "parseInt(document.getElementById('round-count').textContent)"


def test_an_operator_watches_a_live_session_advance_and_stops_it(
    embedded_broker, tmp_path, browser
) -> None:
    """A silent device holds every round open until its 1.5 s deadline, so rounds arrive at a
    watchable pace; the page must show each one without reloading, then stop the session."""
    auth = AuthConfig(secret=generate_secret())
    dep = Deployment(embedded_broker.url, tmp_path)
    try:
        dep.start_combiners(1)
        dep.start_fleet(3)
        dep.own(RogueDevice(dep.url, dep.project, "region-0", "ghost", mode="silent"))
        ctl = dep.controller()
        reader = dep.own(make_store(dep.state_url))
        blobs = FileBlobStore(dep.models_dir)
        server = DashboardServer(
            reader, port=0, auth=auth, project=dep.project, blobs=blobs
        ).start()
        dep.own(server)
        config = SessionConfig(
            session_id="watch-me",
            rounds=40,  # far more than the test waits for: it ends by the stop button
            min_devices=3,
            round_timeout_s=1.5,
            close_grace_s=0.5,
            train={"lr": 0.1, "batch_size": 32},
        )
        ctl.create_session(config, digits.initial_weights())
        outcome: dict[str, str] = {}

        def run() -> None:
            try:
                ctl.run(config.session_id)
                outcome["done"] = "completed"
            except SessionFailed as exc:
                outcome["error"] = str(exc)

        runner = threading.Thread(target=run, daemon=True)
        runner.start()

        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        dep.own(page)
        page.add_init_script(TRACK_STREAMS)
        page.on("dialog", lambda dialog: dialog.accept())  # "Stop session watch-me?"
        page.goto(server.url)
        token = auth.issuer().issue("olga", Role.operator, dep.project)
        _login(page, token)
        page.wait_for_function(
            "document.getElementById('session-status').textContent === 'running'", timeout=10_000
        )
        page.evaluate("window.__sameDocument = true")  # a reload would take this away
        page.wait_for_function(f"{ROUND} >= 1", timeout=15_000)
        before_round, before_points = page.evaluate(ROUND), _points(page)
        assert before_points >= 1 and before_round >= 1
        page.wait_for_function(f"{ROUND} > {before_round}", timeout=15_000)
        page.wait_for_function(f"({POINTS})('accuracy-chart') > {before_points}", timeout=5000)
        assert page.evaluate(ROUND) > before_round and _points(page) > before_points
        assert _points(page, "loss-chart") == _points(page)
        assert page.evaluate("window.__sameDocument") is True, "the page reloaded"
        navigations = page.evaluate("performance.getEntriesByType('navigation').map(n => n.type)")
        assert navigations == ["navigate"], navigations
        assert page.evaluate(OPEN_STREAMS) == [
            "/api/events",
            "/api/fleet/events",
            "/api/sessions/watch-me/events",
        ]
        urls = page.evaluate("window.__streams.map(s => s.url)")
        assert all("ticket=" in u and token not in u for u in urls), urls  # no JWT in a URL
        assert page.is_visible("#stop-session") and page.is_hidden("#start-session")
        progress = page.evaluate("[document.getElementById('progress').value, "
                                 "document.getElementById('progress').max]")  # fmt: skip
        assert progress[1] == 40 and 1 <= progress[0] <= 40

        # lineage: each model row names the version before it as its parent; a download
        # (fetched with the bearer header, handed over as a blob) is the stored blob
        page.wait_for_function(
            "document.querySelectorAll('#models-table tbody tr').length >= 2", timeout=5000
        )
        versions = page.locator("#models-table tbody tr").evaluate_all(
            "rows => rows.map(r => [r.dataset.version, r.cells[1].textContent])"
        )
        for (_, parent), (older, _) in zip(versions, versions[1:]):
            assert parent == older, versions
        newest = versions[0][0]
        with page.expect_download() as dl:
            page.locator(f"#models-table tr[data-version='{newest}'] button.download").click()
        data = Path(dl.value.path()).read_bytes()
        assert hashlib.sha256(data).hexdigest() == reader.get_model(newest).digest

        _shot(page, "dashboard-live.png")
        page.click("#stop-session")
        page.wait_for_function(
            "document.getElementById('session-status').textContent === 'stopped'",
            timeout=20_000,
        )
        runner.join(timeout=20)
        assert not runner.is_alive()
        assert "stopped by request of olga (operator)" in outcome.get("error", ""), outcome
        sess = reader.get_session(config.session_id)
        assert sess is not None and sess.status == "stopped"
        assert page.inner_text("#round-count").replace(" ", "") == f"{sess.current_round}/40"
        # the session's stream ended with it; the sessions and fleet streams stay
        page.wait_for_function(f"({OPEN_STREAMS})().length === 2", timeout=5000)
        assert page.evaluate(OPEN_STREAMS) == ["/api/events", "/api/fleet/events"]
        assert page.is_hidden("#stop-session") and page.is_hidden("#start-session")
        # resume is offered exactly where the API has a resume route (the page reads OpenAPI)
        spec = httpx.get(server.url + "api/openapi.json", timeout=10).json()
        has_resume = any(p.endswith("/resume") and "post" in m for p, m in spec["paths"].items())
        assert has_resume and page.is_visible("#resume-session")
        assert page.evaluate("window.__sameDocument") is True
        _shot(page, "dashboard-stopped.png")
    finally:
        dep.close()


# the devices table as the page shows it: device -> its cells
DEVICE_ROWS = """() => Object.fromEntries([...document.querySelectorAll('#devices-table tbody tr')]
    .map(tr => [tr.dataset.device, [...tr.cells].map(td => td.textContent)]))"""
COMBINER_ROWS = """() => [...document.querySelectorAll('#combiners-table tbody tr')]
    .map(tr => [...tr.cells].map(td => td.textContent))"""
# cells: device, region, state, last seen, task, accepted, declined, rejected, loss, cpu, mem
ROUNDS = 6  # at 1.5 s each: time to stop, resume and watch the fleet in between
NONE = "\u2013"  # the en dash the page shows for no value
COL = {"region": 1, "state": 2, "seen": 3, "task": 4, "accepted": 5, "loss": 8, "cpu": 9, "mem": 10}


def _devices(page: Page) -> dict[str, list[str]]:
    return dict(page.evaluate(DEVICE_ROWS))


def test_an_operator_runs_a_session_on_a_serving_controller_and_watches_the_fleet(
    embedded_broker, tmp_path, browser
) -> None:
    """The whole operator path in the page: create a session in the form, start it, watch
    rounds, curves, devices and combiners move without a reload, stop it, resume it to its
    end. A serving controller (`edgefl controller --serve`) runs it: the page only writes
    the API, as in production. A silent device paces the rounds at their 1.5 s deadline."""
    auth = AuthConfig(secret=generate_secret())
    dep = Deployment(embedded_broker.url, tmp_path)
    try:
        dep.start_combiners(2)
        fleet = dep.start_fleet(4)
        honest = {a.config.device_id: a.config.region for a in fleet.agents}
        dep.own(RogueDevice(dep.url, dep.project, "region-1", "ghost", mode="silent"))
        ctl = dep.controller()
        service = ControllerService(
            ctl, poll_s=0.2, evaluator_for=lambda cfg: None if cfg.package else digits.evaluator
        ).start()
        dep.own(service)
        reader = dep.own(make_store(dep.state_url))  # the API's own connection
        server = DashboardServer(
            reader, port=0, auth=auth, project=dep.project, blobs=FileBlobStore(dep.models_dir)
        ).start()
        dep.own(server)

        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        dep.own(page)
        page.add_init_script(TRACK_STREAMS)
        page.on("dialog", lambda dialog: dialog.accept())  # "Stop session from-browser?"
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url)
        token = auth.issuer().issue("olga", Role.operator, dep.project)
        _login(page, token)
        page.evaluate("window.__sameDocument = true")  # a reload would take this away

        # the fleet before any session: every device and both combiners, online
        page.wait_for_function(
            f"Object.keys(({DEVICE_ROWS})()).length === 5 && "
            "document.querySelectorAll('#combiners-table tbody tr').length === 2",
            timeout=15_000,
        )
        shown = _devices(page)
        assert sorted(shown) == sorted([*honest, "ghost"])
        for name, region in [*honest.items(), ("ghost", "region-1")]:
            assert (shown[name][COL["region"]], shown[name][COL["state"]]) == (region, "online")
            assert shown[name][COL["seen"]].endswith("ago"), shown[name]
        assert page.inner_text("#fleet-counts") == "5 of 5 online"
        combiners = page.evaluate(COMBINER_ROWS)
        assert [c[:3] for c in combiners] == [
            ["combiner-region-0", "region-0", "online"],
            ["combiner-region-1", "region-1", "online"],
        ]

        # a new session from the form: created, offered to start (not resume)
        page.click("#new-session summary")
        page.fill("#new-id", "from-browser")
        page.fill("#new-rounds", str(ROUNDS))
        page.fill("#new-min-devices", "4")
        page.fill("#new-timeout", "1.5")
        page.click("#create-session")
        page.wait_for_function(
            "document.getElementById('session-status').textContent === 'created'", timeout=10_000
        )
        assert "from-browser" in page.inner_text("#session-name")
        assert page.is_visible("#start-session") and page.is_hidden("#resume-session")
        assert page.is_visible("#stop-session")  # a created session can be stopped at once
        time.sleep(0.5)  # created is not queued: the serving controller leaves it alone
        assert reader.get_session("from-browser").status == "created"
        page.click("#new-session summary")  # it closed once the session was made
        page.fill("#new-id", "from-browser")  # the id is taken now: the API's reason shows
        page.click("#create-session")
        page.wait_for_function(
            "document.getElementById('create-error').textContent.includes('exists')",
            timeout=5000,
        )

        page.click("#start-session")
        page.wait_for_function(f"{ROUND} >= 1", timeout=20_000)
        before_round, before_points = page.evaluate(ROUND), _points(page)
        assert before_points >= 1 and before_round < ROUNDS
        page.wait_for_function(f"{ROUND} > {before_round}", timeout=15_000)
        page.wait_for_function(f"({POINTS})('accuracy-chart') > {before_points}", timeout=5000)
        assert _points(page, "loss-chart") == _points(page)

        # stop it mid-way, then resume it: it goes on from its last completed round
        page.click("#stop-session")
        page.wait_for_function(
            "document.getElementById('session-status').textContent === 'stopped'",
            timeout=20_000,
        )
        assert page.evaluate(ROUND) < ROUNDS - 2  # rounds left to watch the fleet work in
        assert page.is_visible("#resume-session") and page.is_hidden("#start-session")
        assert page.is_hidden("#stop-session")
        page.click("#resume-session")
        page.wait_for_function(
            "document.getElementById('session-status').textContent === 'running'",
            timeout=10_000,
        )
        assert page.is_hidden("#resume-session") and page.is_visible("#stop-session")

        # the fleet at work: the silent device holds a task, combiners count their round,
        # the honest devices' counts and training telemetry arrive as they report
        page.wait_for_function(
            f"(({DEVICE_ROWS})().ghost || [])[{COL['task']}].startsWith('from-browser:')",
            timeout=10_000,
        )
        page.wait_for_function(
            f"Object.entries(({DEVICE_ROWS})()).filter(([n, c]) => n !== 'ghost' && "
            f"parseInt(c[{COL['accepted']}]) >= 2 && !isNaN(parseFloat(c[{COL['loss']}])) && "
            f"!isNaN(parseFloat(c[{COL['mem']}]))).length === 4",
            timeout=10_000,
        )
        shown = _devices(page)
        for name in honest:
            loss = float(shown[name][COL["loss"]])
            assert 0 < loss < 5 and 0 < float(shown[name][COL["mem"]]) <= 100, shown[name]
        assert shown["ghost"][COL["loss"]] == NONE  # it never trained
        row = page.locator("#devices-table tr[data-device='ghost']")
        assert row.get_attribute("title") == "no telemetry yet"
        assert "train_loss = " in (page.locator(f"#devices-table tr[data-device='{name}']")
                                   .get_attribute("title") or "")  # fmt: skip
        page.wait_for_function(
            f"({COMBINER_ROWS})().every(c => parseInt(c[4]) >= 2 && parseInt(c[6]) >= 4)",
            timeout=10_000,
        )
        _shot(page, "dashboard-fleet.png")

        # the filters narrow the stream itself (GET /api/fleet/events?region=&state=)
        page.select_option("#region-filter", "region-1")
        page.wait_for_function(f"Object.keys(({DEVICE_ROWS})()).length === 3", timeout=10_000)
        region1 = sorted(n for n, r in honest.items() if r == "region-1")
        assert sorted(_devices(page)) == sorted([*region1, "ghost"])
        page.select_option("#state-filter", "offline")
        page.wait_for_function(
            "document.getElementById('no-devices').textContent === 'no devices match'",
            timeout=10_000,
        )
        assert _devices(page) == {} and page.is_visible("#no-devices")
        fleet_urls = [u for u in page.evaluate("window.__streams.map(s => s.url)")
                      if "/api/fleet/events" in u]  # fmt: skip
        assert "region=region-1" in fleet_urls[-1] and "state=offline" in fleet_urls[-1]
        page.select_option("#region-filter", "")
        page.select_option("#state-filter", "")
        page.wait_for_function(f"Object.keys(({DEVICE_ROWS})()).length === 5", timeout=10_000)

        page.wait_for_function(
            "document.getElementById('session-status').textContent === 'completed'",
            timeout=30_000,
        )
        assert page.inner_text("#round-count").replace(" ", "") == f"{ROUNDS}/{ROUNDS}"
        assert _points(page) == ROUNDS and _points(page, "loss-chart") == ROUNDS
        assert page.is_hidden("#resume-session") and page.is_hidden("#stop-session")
        sess = reader.get_session("from-browser")
        assert sess is not None and sess.status == "completed" and sess.current_round == ROUNDS
        completed = [r.round for r in reader.list_rounds("from-browser") if r.status == "completed"]
        assert completed == list(range(1, ROUNDS + 1))  # none twice, none skipped
        page.wait_for_function(
            f"({DEVICE_ROWS})().ghost[{COL['task']}] === '{NONE}'", timeout=10_000
        )  # the round closed: no task held any more

        assert page.evaluate("window.__sameDocument") is True, "the page reloaded"
        navigations = page.evaluate("performance.getEntriesByType('navigation').map(n => n.type)")
        assert navigations == ["navigate"], navigations
        urls = page.evaluate("window.__streams.map(s => s.url)")
        assert all("ticket=" in u and token not in u for u in urls), urls  # no JWT in a URL
        assert "/api/fleet/events" in page.evaluate(OPEN_STREAMS)
        assert errors == [], errors  # the page's script never threw
        _shot(page, "dashboard-resumed.png")
    finally:
        dep.close()
